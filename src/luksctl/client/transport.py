"""One HTTPS exchange with a luksctl API, under one deadline, through the Vault client's
transport (luksctl.vault.request): http.client with no proxy, no redirect, and sockets a timer
cuts when the deadline strikes. Standard library ssl/http.client because pinning must read the
server's certificate after the handshake and before the request is sent, which an HTTP
library's verify=True/False does not let us do."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

from .. import vault
from .pinning import CertificateChanged, Trust

DEFAULT_PORT = 5000


class HostFailed(Exception):
    """The host could not be asked: the message says why, and never holds a body we sent."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(text: str) -> Target:
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT."""
    parts = urllib.parse.urlsplit(f"//{text}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname or parts.path or parts.username:
        raise ValueError(f"{text!r} is not HOST[:PORT]")
    return Target(parts.hostname, port)


def exchange(target: Target, method: str, path: str, *, trust: Trust, deadline: vault.Deadline,
             timeout: float, body: dict | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON object). Raises HostFailed."""
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        status, raw = vault.request(method, f"https://{target}{path}", deadline=deadline, timeout=timeout, tls=trust.context,
                                    headers=headers, body=data, check_peer=trust.peer_check(str(target)))
    except CertificateChanged as exc:
        raise HostFailed(str(exc)) from None
    except vault.DeadlineExceeded:
        raise HostFailed(f"no answer within {deadline.seconds:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise HostFailed(f"its certificate is not trusted by {trust.ca_file}: {exc.verify_message}") from None
    except vault.RedirectRefused:
        raise HostFailed("it answered with a redirect; not followed") from None
    except TimeoutError:
        raise HostFailed(f"no answer within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise HostFailed(f"unknown host: {exc.strerror}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise HostFailed(getattr(exc, "strerror", None) or exc.__class__.__name__) from None
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise HostFailed(f"HTTP {status} with a body that is not a JSON object")
    return status, parsed
