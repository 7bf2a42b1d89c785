"""Worker modules that ``benchmarks/broker.py`` starts with the ``dramatiq`` CLI."""
