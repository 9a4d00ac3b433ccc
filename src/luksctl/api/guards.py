"""Who the client is (behind the proxy), and refusing callers outside ALLOWED_CLIENTS."""

from __future__ import annotations

import ipaddress

from flask import Flask, request
from werkzeug.middleware.proxy_fix import ProxyFix

from ..errors import CallerRefused


def client_allowed(networks: list | None, address: str | None) -> bool:
    if networks is None:
        return True
    try:
        parsed = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(parsed in network for network in networks)


def refusal_message(address: str | None) -> str:
    return f"client address {address} is not in ALLOWED_CLIENTS"


def trust_the_proxy_on_unix_sockets(app: Flask) -> None:
    """The client's address is the proxy's X-Forwarded-For (one hop, which nginx overwrites), but
    only for a request that came over a Unix socket: only the proxy can reach gunicorn's
    (deploy/luksctl-api.service). Over TCP a peer has an IP address, and the header is ignored."""
    direct = app.wsgi_app
    behind_proxy = ProxyFix(direct, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)

    def wsgi_app(environ, start_response):
        via = direct if _is_ip_address(environ.get("REMOTE_ADDR")) else behind_proxy
        return via(environ, start_response)

    app.wsgi_app = wsgi_app


def _is_ip_address(value: str | None) -> bool:
    try:
        ipaddress.ip_address(value or "")
    except ValueError:
        return False
    return True


def install_client_allowlist(app: Flask, networks: list | None) -> None:
    # nginx refuses these addresses before anything is proxied (api/proxy.py); this is the same
    # rule again, for a request that reaches gunicorn some other way.
    trust_the_proxy_on_unix_sockets(app)
    if networks is None:
        return

    @app.before_request
    def refuse_unknown_clients():
        if not client_allowed(networks, request.remote_addr):
            raise CallerRefused(refusal_message(request.remote_addr))
