"""gunicorn settings shared by luksctl-api.service and luksctl-api-wn.service.

The units' ExecStart keeps the historic flags (--workers 2, --bind, -m 007,
--certfile, --keyfile); those on the command line win over this file.
"""

import ssl

# gthread, except that the event loop does the TLS handshake and reads each request whole
# (within 30 s) before a thread takes it, and answers a client outside ALLOWED_CLIENTS 403
# itself once that request is read: neither slow nor refused clients cost a thread (issue 10).
# Threads keep status polls answering while one open waits minutes on cryptsetup.
worker_class = "luksctl.api.gunicorn_worker.ReadFirstThreadWorker"
threads = 8
# Requests are buffered whole before a thread sees them (64 KiB at most, MAX_BUFFERED):
# these keep the largest head (4 KiB line + 32 x 1 KiB fields) plus the 16 KiB body under it.
limit_request_fields = 32
limit_request_field_size = 1024
# Longer than an open may take (config PRIVILEGED_TIMEOUT, 180 s by default) so no worker is killed mid-open.
timeout = 240
graceful_timeout = 30
# gthread closes a new connection whose first request is not in within `keepalive`
# seconds; 2 s (the default) dropped TLS handshakes of polls on a loaded VM.
keepalive = 30
# journald keeps both logs; nothing goes to world-writable /tmp as the old tool's did.
# The service users have no home for gunicorn's control socket, and nothing uses it.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = "info"
# Merged over gunicorn's defaults: the app's own loggers ("luksctl.*") reach stderr at INFO.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}


def ssl_context(config, default_ssl_context_factory):
    context = default_ssl_context_factory()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def post_worker_init(worker):
    from luksctl.api.gunicorn_errors import answer_malformed_requests_in_json

    answer_malformed_requests_in_json(worker.wsgi)


def on_starting(server):
    # The old tool fell back to plain HTTP when its certificate was missing; we refuse instead.
    from luksctl.config import plain_http_allowed

    if not server.cfg.is_ssl and not plain_http_allowed():
        raise SystemExit("luksctl: refusing to serve plain HTTP: pass --certfile/--keyfile, or set ALLOW_PLAIN_HTTP in config.json")


# /metrics across the workers (prometheus_client's multiprocess mode): the units set
# PROMETHEUS_MULTIPROC_DIR to a directory under their RuntimeDirectory=. The master empties it
# before any worker starts (a previous run's counts are not this run's), and drops the live
# values of each worker that exits.
def when_ready(server):
    import os
    from pathlib import Path

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    for stale in Path(directory).glob("*.db") if directory else ():
        stale.unlink()


def child_exit(server, worker):
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
