"""certs.py and `luksctl-api gen-cert`: the self-signed certificate gunicorn serves."""

from __future__ import annotations

import datetime
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from luksctl.api import certs
from luksctl.api.admin import main_frontend

NOBODY = 65534


@pytest.fixture
def written(tmp_path):
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certs.write_certificate(cert_file, key_file, hostnames=["luks.example.org"], extra_addresses=["192.0.2.7"], owner="nobody", days=30)
    return cert_file, key_file


def test_key_is_private_to_its_owner(written):
    _, key_file = written
    info = key_file.stat()

    assert stat.S_IMODE(info.st_mode) == 0o600
    assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY)


def test_certificate_is_public_and_root_owned(written):
    cert_file, _ = written
    info = cert_file.stat()

    assert stat.S_IMODE(info.st_mode) == 0o644 and info.st_uid == 0


def test_certificate_names_and_validity(written):
    cert_file, key_file = written
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    now = datetime.datetime.now(datetime.timezone.utc)

    assert "luks.example.org" in sans.get_values_for_type(x509.DNSName)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("192.0.2.7")} <= set(sans.get_values_for_type(x509.IPAddress))
    assert certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc
    assert certificate.not_valid_after_utc - now <= datetime.timedelta(days=30)


def test_key_matches_certificate(written):
    cert_file, key_file = written
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)

    assert key.public_key().public_numbers() == certificate.public_key().public_numbers()


def gen_cert(tmp_path, *extra: str) -> int:
    return main_frontend(
        ["gen-cert", "--cert", str(tmp_path / "cert.pem"), "--key", str(tmp_path / "key.pem"), "--owner", "nobody", "--hostname", "h.example", *extra]
    )


def test_gen_cert_refuses_to_overwrite_without_force(tmp_path):
    assert gen_cert(tmp_path) == 0
    before = (tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()

    assert gen_cert(tmp_path) == 64

    assert ((tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()) == before


def test_gen_cert_force_replaces(tmp_path):
    assert gen_cert(tmp_path) == 0
    before = (tmp_path / "cert.pem").read_bytes()

    assert gen_cert(tmp_path, "--force") == 0

    assert (tmp_path / "cert.pem").read_bytes() != before


def test_gen_cert_unknown_owner_fails_cleanly_and_leaves_no_files(tmp_path):
    out = tmp_path / "luks"
    out.mkdir()

    assert main_frontend(["gen-cert", "--cert", str(out / "c.pem"), "--key", str(out / "k.pem"), "--owner", "no-such-user-xyz"]) == 3

    assert sorted(path.name for path in out.iterdir()) == []
