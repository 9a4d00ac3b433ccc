"""Self-signed TLS certificate for gunicorn, made with `cryptography` (no openssl process)."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import pwd
import socket
import struct
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_FILE = Path("/etc/luks/gunicorn-cert.pem")
KEY_FILE = Path("/etc/luks/gunicorn-key.pem")
SIOCGIFADDR = 0x8915


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this host, read from the kernel so the SANs match what clients dial."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            found.add(ipaddress.ip_address(bytes(answer[20:24])))
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.ip_address(bytes.fromhex(line.split()[0])))
    except OSError:
        pass
    return found


def build_certificate(hostnames: list[str], addresses: set, days: int) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    # A subject of its own: in WN_CA_BUNDLE, OpenSSL looks a self-signed certificate up by its
    # subject, and of two workers with the same host name (say, `localhost`) only one verified.
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0]),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, format(serial, "x")),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(host) for host in dict.fromkeys(hostnames)] + [x509.IPAddress(ip) for ip in sorted(addresses, key=str)]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _write_atomically(path: Path, data: bytes, mode: int, owner: str | None) -> None:
    """Readers see the old file or the whole new one, with its final mode and owner."""
    entry = pwd.getpwnam(owner) if owner else None  # an unknown user fails before any file exists
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(fd, mode)  # the umask must not widen or narrow it
            if entry:
                os.fchown(fd, entry.pw_uid, entry.pw_gid)
            file.write(data)
            file.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_certificate(cert_file: Path, key_file: Path, *, hostnames: list[str], extra_addresses: list[str], owner: str | None, days: int) -> None:
    addresses = local_addresses() | {ipaddress.ip_address(a) for a in extra_addresses}
    cert_pem, key_pem = build_certificate(hostnames, addresses, days)
    # The key first: a certificate without its key would stop gunicorn.
    _write_atomically(key_file, key_pem, 0o600, owner)
    _write_atomically(cert_file, cert_pem, 0o644, None)


def default_hostnames() -> list[str]:
    return list(dict.fromkeys([socket.getfqdn(), socket.gethostname(), "localhost"]))
