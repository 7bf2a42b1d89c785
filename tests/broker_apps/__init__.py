"""Worker modules that the ``dramatiq`` CLI imports in the broker tests."""
