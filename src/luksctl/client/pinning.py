"""Which certificate each server may present: a named CA, or the fingerprint recorded on first
use in a known-hosts file (ssh's model: trust on first use, refuse any change after)."""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import VaultError
from ..vault import tls_context


class CertificateChanged(Exception):
    """The server presented another certificate than the one recorded for its name."""


class TrustError(Exception):
    """The CA bundle cannot be used."""


def default_known_hosts() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "luksctl" / "known_hosts"


def fingerprint(der: bytes) -> str:
    """As `openssl x509 -noout -fingerprint -sha256` prints it, so a user can compare the two."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


class KnownHosts:
    """Lines of `host:port SHA256-fingerprint`. Status asks many hosts from threads: one lock."""

    def __init__(self, path: Path, announce: Callable[[str], None]):
        self.path = path
        self._announce = announce
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        return dict(line.split(maxsplit=1) for line in lines if line.strip() and not line.startswith("#"))

    def _write(self, known: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".known_hosts.", delete=False) as out:
            out.writelines(f"{name} {fp}\n" for name, fp in sorted(known.items()))
        os.replace(out.name, self.path)  # a reader never sees half a file

    def check(self, name: str, der: bytes) -> None:
        """Records an unknown server's fingerprint; raises CertificateChanged for a known one that differs."""
        presented = fingerprint(der)
        with self._lock:
            known = self._read()
            recorded = known.get(name)
            if recorded == presented:
                return
            if recorded is not None:
                raise CertificateChanged(
                    f"the certificate of {name} has changed: {self.path} records SHA256 {recorded}, the server "
                    f"presented SHA256 {presented}. Someone may be impersonating the server; nothing was sent. "
                    f"If the server's certificate was replaced on purpose, run `luksctl-client forget {name}` "
                    "and connect again to record the new one")
            known[name] = presented
            self._write(known)
        self._announce(f"recorded {name} in {self.path}: SHA256 fingerprint {presented}")

    def forget(self, name: str) -> bool:
        with self._lock:
            known = self._read()
            if known.pop(name, None) is None:
                return False
            self._write(known)
            return True


class Trust:
    """A CA bundle (normal verification, host name included) or the known-hosts pins."""

    def __init__(self, known_hosts: KnownHosts, ca_file: str | None = None):
        self.known_hosts = known_hosts
        self.ca_file = ca_file
        if ca_file is not None:
            if not os.path.isfile(ca_file):
                raise TrustError(f"the CA bundle {ca_file} does not exist")
            try:
                self.context = tls_context(ca_file)
            except VaultError as exc:  # the one TLS context builder names itself after Vault
                raise TrustError(exc.message) from None
        else:
            # The chain is not checked by OpenSSL here: check_pin compares the certificate
            # itself with the recorded one, after the handshake and before any byte is sent.
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.context.minimum_version = ssl.TLSVersion.TLSv1_2
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE

    def peer_check(self, name: str) -> Callable[[bytes], None] | None:
        """What to run on the server's certificate before sending (None: OpenSSL verified it)."""
        if self.ca_file is not None:
            return None
        return lambda der: self.known_hosts.check(name, der)
