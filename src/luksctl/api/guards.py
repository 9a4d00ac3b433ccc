"""Refuse callers outside ALLOWED_CLIENTS before any view runs."""

from __future__ import annotations

import ipaddress

from flask import Flask, request

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


def install_client_allowlist(app: Flask, networks: list | None) -> None:
    # gunicorn's worker (gunicorn_worker.py) refuses from its event loop once the request is
    # read, before a thread is spent; this hook is the same rule for any other server.
    app.extensions["luksctl_allowed_clients"] = networks
    if networks is None:
        return

    @app.before_request
    def refuse_unknown_clients():
        if not client_allowed(networks, request.remote_addr):
            raise CallerRefused(refusal_message(request.remote_addr))
