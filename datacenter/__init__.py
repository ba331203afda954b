"""The datacenter portal: Django project package (settings, urls, asgi, Celery app)."""

from .celery import app as celery_app

__all__ = ["celery_app"]
