"""README: `luksctl-api gen-cert` makes an ECDSA P-256 key and a certificate naming this host and
every local address, so workers and the dashboard can dial any of them. The addresses are
checked against iproute2's list, not against certs.py's own way of finding them."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from luksctl.api.admin import main_frontend


def addresses_iproute2_sees() -> set:
    interfaces = json.loads(subprocess.run(["ip", "-json", "address"], capture_output=True, check=True, timeout=30).stdout)
    return {ipaddress.ip_address(address["local"]) for interface in interfaces for address in interface.get("addr_info", [])}


def test_gen_cert_defaults_to_ecdsa_p256_and_every_local_address(tmp_path):
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"

    assert main_frontend(["gen-cert", "--cert", str(cert_file), "--key", str(key_file), "--owner", "nobody"]) == 0

    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    sans = x509.load_pem_x509_certificate(cert_file.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    local = addresses_iproute2_sees()
    assert ipaddress.ip_address("127.0.0.1") in local
    assert local <= set(sans.get_values_for_type(x509.IPAddress))
    assert {socket.gethostname(), "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
