"""The REST services: `create_frontend_app()` and `create_worker_app()` for gunicorn.

Imported on first use, not with the package: the admin commands (gen-cert, proxy-config,
check-config) run as root under the service's environment (ExecStartPre=) and must not import
metrics.py, which creates files in PROMETHEUS_MULTIPROC_DIR when imported.
"""

from importlib import import_module

__all__ = ["create_frontend_app", "create_worker_app"]
_MODULE_OF = {"create_frontend_app": ".frontend", "create_worker_app": ".worker"}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_MODULE_OF[name], __name__), name)
