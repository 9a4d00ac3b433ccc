"""The one Vault client's guards, on both sides (issue 19, item 1): the environment's CA
does not count, a trickling Vault is cut at the exchange's deadline, and http:// needs
an explicit allowance. Root side: `luksctl rotate` and `decommission` end to end (real
LUKS headers in image files) and setup's client; API side: POST /open and fetch_passphrase.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import ssl
import subprocess
import threading

import pytest
from support.waiting import wait_until

from luksctl import vault
from luksctl.api.certs import build_certificate
from luksctl.errors import EXIT_USAGE, EXIT_VAULT_UNREACHABLE, VaultUnreachable
from luksctl.root import setup
from luksctl.root.journal import Journal

from .conftest import OPEN_URL, LocalServer, in_thread, json_answer, open_body

WRAPPING = "hvs.guard-test-wrapping-token"
UNWRAP_ANSWER = json_answer({"auth": {"client_token": "hvs.inner"}, "data": {"creation_path": "auth/token/create"}})
REF = vault.SecretRef("secrets", "a/b/storage_encryption", "storage_encryption_key")


@pytest.fixture
def attacker_vault(tmp_path, monkeypatch):
    """An HTTPS 'Vault' on 127.0.0.1 whose certificate is its own CA, which SSL_CERT_FILE
    and SSL_CERT_DIR name: whatever honours them sends it the token."""
    cert_pem, key_pem = build_certificate(["localhost"], {ipaddress.ip_address("127.0.0.1")}, 1)
    certs = tmp_path / "attacker-certs"
    certs.mkdir()
    (certs / "ca.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    if shutil.which("openssl"):
        subprocess.run(["openssl", "rehash", str(certs)], check=True, capture_output=True, timeout=30)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "ca.pem", tmp_path / "key.pem")
    server = LocalServer(lambda seen, body: UNWRAP_ANSWER)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.https_url = f"https://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def trickler(local_server):
    """A 'Vault' that answers one byte every 0.8 s: no socket read ever waits 1 s."""
    server = local_server(lambda seen, body: UNWRAP_ANSWER)
    server.trickle = lambda seen: 0.8
    return server


def vault_args(url: str, *extra: str) -> list[str]:
    return ["--vault-url", url, "--secret-path", "a/b/storage_encryption", "--wrapping-token-file", "-", *extra]


def run_in_lab(lab, capsys, command: list[str], bound: float = 20):
    return in_thread(lambda: lab.run(capsys, *command, stdin=WRAPPING.encode() + b"\n"), bound)


# --- SSL_CERT_FILE / SSL_CERT_DIR change nothing -----------------------------------------------


@pytest.mark.parametrize("command", [["rotate"], ["decommission", "--yes"]])
def test_root_commands_send_no_token_to_a_vault_signed_by_the_environments_ca(lab, capsys, attacker_vault, command):
    (code, answer), _ = run_in_lab(lab, capsys, [*command, *vault_args(attacker_vault.https_url)])

    assert code == EXIT_VAULT_UNREACHABLE and "could not be verified" in answer["error"], answer
    assert attacker_vault.seen == [], "the token went to a server only the environment's CA vouches for"


def store_with_setup(target: setup.VaultTarget, state_dir) -> None:
    """setup's own Vault step (it unwraps first), with a journal begun as a run would have."""
    record = Journal(state_dir / "setup-state")
    record.begin(b"new volume passphrase", {})
    setup.store_in_vault(target, b"new volume passphrase", record)


def test_setups_client_sends_no_token_to_a_vault_signed_by_the_environments_ca(attacker_vault, tmp_path):
    target = setup.VaultTarget(attacker_vault.https_url, REF, token=WRAPPING)

    with pytest.raises(VaultUnreachable, match="could not be verified"):
        store_with_setup(target, tmp_path)
    assert attacker_vault.seen == []


def test_the_apis_open_sends_no_token_to_a_vault_signed_by_the_environments_ca(frontend_app, fake_bridge, attacker_vault):
    response = frontend_app.test_client().post(OPEN_URL, json=open_body(attacker_vault.https_url, WRAPPING, "a/b/storage_encryption"))

    assert response.status_code == 502, response.get_json()
    assert attacker_vault.seen == [] and fake_bridge.passphrases == []


def test_tls_verifies_by_default():
    context = vault.tls_context()
    assert (context.verify_mode, context.check_hostname, context.minimum_version) == (ssl.CERT_REQUIRED, True, ssl.TLSVersion.TLSv1_2)


def test_no_system_bundle_and_none_named_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(vault, "SYSTEM_CA_FILES", (str(tmp_path / "a.crt"), str(tmp_path / "b.crt")))
    with pytest.raises(vault.VaultError) as refused:
        vault.tls_context()
    assert refused.value.message == f"no system CA bundle at {tmp_path / 'a.crt'} or {tmp_path / 'b.crt'}; name a CA bundle"


@pytest.mark.parametrize(("content", "reason"), [(None, "No such file or directory"), (b"not a certificate", "[X509: NO_CERTIFICATE_OR_CRL_FOUND]")])
def test_a_ca_bundle_that_cannot_be_loaded_says_which_and_why(tmp_path, content, reason):
    bundle = tmp_path / "ca.crt"
    if content is not None:
        bundle.write_bytes(content)
    with pytest.raises(vault.VaultError) as refused:
        vault.tls_context(str(bundle))
    # OpenSSL's reason ends in its source line ("(_ssl.c:4123)"), which changes with its version.
    assert refused.value.message.startswith(f"the CA bundle {bundle} cannot be loaded: {reason}")


def test_the_system_bundle_is_a_file_named_explicitly():
    """What the client trusts by default: OpenSSL's compiled-in file (Debian's ca-certificates.crt), not SSL_CERT_FILE."""
    assert "/etc/ssl/certs/ca-certificates.crt" in vault.SYSTEM_CA_FILES
    assert ssl.get_default_verify_paths().openssl_cafile in vault.SYSTEM_CA_FILES


# --- one deadline for the whole exchange -----------------------------------------------------------


def lock_is_free(path) -> bool:
    """Whether an open could take the volume lock now. flock(2) locks belong to the open file
    description, so a probe in this process conflicts with a holder in it too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("command", [["rotate"], ["decommission", "--yes"]])
def test_root_commands_cut_a_trickling_vault_at_vault_timeout(lab, capsys, trickler, command):
    """...and hold the volume lock for none of that time: the unwrap comes before the lock."""
    lock_seen_free = []

    def probe_the_lock_while_vault_trickles():
        wait_until(lambda: trickler.seen, 10, "the trickling Vault to be asked", interval=0.02)
        lock_seen_free.append(lock_is_free(lab.paths.lock_file))

    prober = threading.Thread(target=probe_the_lock_while_vault_trickles, daemon=True)
    prober.start()
    (code, answer), elapsed = run_in_lab(lab, capsys, [*command, *vault_args(trickler.url, "--vault-allow-http", "--vault-timeout", "1")])
    prober.join(10)

    assert code == EXIT_VAULT_UNREACHABLE and "did not answer within 1 s" in answer["error"], answer
    assert elapsed < 1 + 1, elapsed
    assert lock_seen_free == [True]


def test_setups_client_cuts_a_trickling_vault_at_vault_timeout(trickler, tmp_path):
    target = setup.VaultTarget(trickler.url, REF, token=WRAPPING, timeout=1, allow_http=True)

    error, elapsed = in_thread(lambda: store_with_setup(target, tmp_path), 20)

    assert isinstance(error, VaultUnreachable), error
    assert elapsed < 1 + 1, elapsed


def test_the_apis_exchange_cuts_a_trickling_vault_at_vault_deadline(trickler):
    settings = vault.VaultSettings(timeout=10, deadline=1, allow_http=True)

    error, elapsed = in_thread(lambda: vault.fetch_passphrase(trickler.url, REF, WRAPPING, settings), 20)

    assert isinstance(error, VaultUnreachable), error
    assert elapsed < 1 + 1, elapsed


# --- http:// only when allowed ----------------------------------------------------------------------


def test_the_client_refuses_plain_http_without_the_allowance(local_server):
    server = local_server(lambda seen, body: UNWRAP_ANSWER)

    with pytest.raises(vault.PlainHttpRefused, match="plain http://"):
        vault.VaultClient(server.url).unwrap(WRAPPING)
    assert server.seen == []


def test_root_commands_refuse_plain_http_without_vault_allow_http(lab, capsys, local_server):
    server = local_server(lambda seen, body: UNWRAP_ANSWER)

    (code, answer), _ = run_in_lab(lab, capsys, ["rotate", *vault_args(server.url)])

    assert code == EXIT_USAGE and "plain http://" in answer["error"], answer
    assert server.seen == []


def test_the_api_refuses_plain_http_without_allow_plain_http(make_frontend_app, fake_bridge, local_server):
    server = local_server(lambda seen, body: UNWRAP_ANSWER)
    app = make_frontend_app(ALLOW_PLAIN_HTTP=False)

    response = app.test_client().post(OPEN_URL, json=open_body(server.url, WRAPPING, "a/b/storage_encryption"))

    assert response.status_code == 400 and "plain http://" in response.get_json()["error"], response.get_json()
    assert server.seen == [] and fake_bridge.passphrases == []
