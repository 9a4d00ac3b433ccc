"""The REST services: `create_frontend_app()` and `create_worker_app()` for gunicorn."""

from .frontend import create_frontend_app
from .worker import create_worker_app

__all__ = ["create_frontend_app", "create_worker_app"]
