"""gunicorn settings shared by luksctl-api.service and luksctl-api-wn.service.

gunicorn serves on a Unix socket behind the proxy (luksctl-proxy@.service, nginx), which
terminates TLS and reads every request whole, within bounded times and sizes, before it
reaches gunicorn: slow and refused clients cost nginx a connection and gunicorn nothing.
That is the deployment gunicorn's own guide asks for. The units' ExecStart keeps the
historic --workers 2 and -m 007; those on the command line win over this file.
"""

# Stock gthread: threads keep status polls answering while one open waits minutes on cryptsetup.
worker_class = "gthread"
threads = 8
# Only nginx connects, one connection per request in progress; nginx itself allows 4,096
# connections per worker process (api/proxy.py). 64 covers 8 threads with room for queued
# requests, well under the unit's LimitNOFILE (1,024 by default).
worker_connections = 64
# nginx already bounds the head (a 4 KiB line or field, 17 KiB in all) and answers in JSON
# what it refuses; these only have to let through whatever nginx forwards, so gunicorn never
# answers a proxied request with an error page of its own.
limit_request_line = 8190
limit_request_fields = 32768
limit_request_field_size = 8190
# Longer than an open may take (config PRIVILEGED_TIMEOUT, 180 s by default) so no worker is killed mid-open.
timeout = 240
graceful_timeout = 30
keepalive = 30
# journald keeps both logs; nothing goes to world-writable /tmp as the old tool's did.
# The service users have no home for gunicorn's control socket, and nothing uses it.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = "info"
# The peer of a Unix socket has no address: the client is nginx's X-Forwarded-For, which it overwrites.
access_log_format = '%({x-forwarded-for}i)s "%(r)s" %(s)s %(b)s %(L)ss'
# Merged over gunicorn's defaults: the app's own loggers ("luksctl.*") reach stderr at INFO.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}


def ssl_context(config, default_ssl_context_factory):
    import ssl

    context = default_ssl_context_factory()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def on_starting(server):
    # The old tool fell back to plain HTTP when its certificate was missing; we refuse to serve a
    # TCP port without TLS. A Unix socket is the proxy's, which serves the TLS.
    from luksctl.config import plain_http_allowed

    tcp = [address for address in server.cfg.bind if not address.startswith("unix:")]
    if tcp and not server.cfg.is_ssl and not plain_http_allowed():
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
