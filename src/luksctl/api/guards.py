"""Refuse callers outside ALLOWED_CLIENTS before any view runs."""

from __future__ import annotations

import ipaddress

from flask import Flask, request

from ..errors import CallerRefused


def install_client_allowlist(app: Flask, networks: list | None) -> None:
    if networks is None:
        return

    @app.before_request
    def refuse_unknown_clients():
        try:
            address = ipaddress.ip_address(request.remote_addr or "")
        except ValueError:
            address = None
        if address is None or not any(address in network for network in networks):
            raise CallerRefused(f"client address {request.remote_addr} is not in ALLOWED_CLIENTS")
