"""Celery apps that the Celery tests run in real ``celery worker`` processes."""
