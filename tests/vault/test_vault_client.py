"""VaultClient (the one Vault client, standard library only) against a real OpenBao.

Policies and tokens exactly as the dashboard makes them (PROTOCOL §7): `write_only`
grants `create` only on secrets/data/<user>/*, and the token is created with
`X-Vault-Wrap-TTL: 1h` and `{"policies":["write_only"],"ttl":"12h","period":"12h"}`.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from support.bao import ROOT_TOKEN
from support.policies import READ_POLICY, WRITE_ONLY
from support.waiting import wait_until

from luksctl.errors import SecretExists, SecretNotFound, VaultDenied, VaultError, VaultUnreachable, VaultWriteDenied, WrappingTokenInvalid
from luksctl.vault import Deadline, DeadlineExceeded, PlainHttpRefused, RedirectRefused, SecretRef, VaultClient, request, tls_context

from .conftest import DELETE, KV1_ROOT, KV2_ROOT, READ_WRITE, SECRET_KEY, json_answer

def dashboard_wrapping_token(bao, policy: str = WRITE_ONLY) -> str:
    """`POST /v1/auth/token/create` as the dashboard sends it at deployment time."""
    return bao.wrap_token("1h", policies=(policy,), token_ttl="12h", period="12h")


def new_ref(*, kv_version: int = 2) -> SecretRef:
    root = KV2_ROOT if kv_version == 2 else KV1_ROOT
    return SecretRef(root, f"sub-{uuid.uuid4().hex[:10]}/{uuid.uuid4()}/storage_encryption", SECRET_KEY, kv_version)


def client_of(server) -> VaultClient:
    """A client of a LocalServer, with a token: what most answer-shape tests need."""
    return VaultClient(server.url, token="hvs.t", timeout=5, allow_http=True)


def root_read(bao, ref: SecretRef) -> dict:
    return bao.request("GET", ref.data_path).json()["data"]


def test_dashboard_flow_unwrap_create_version_1_then_revoke(policies):
    bao = policies
    ref = new_ref()
    client = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao))
    token = client._token

    assert client.capabilities(ref) == {"create"}
    assert client.write(ref, "the passphrase", cas=0) == 1
    client.revoke_self()

    assert root_read(bao, ref)["data"] == {SECRET_KEY: "the passphrase"}
    assert not bao.token_alive(token)


def test_second_create_only_write_is_refused_and_keeps_the_first(policies):
    bao = policies
    ref = new_ref()
    VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao)).write(ref, "first", cas=0)

    second = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao))
    with pytest.raises(VaultWriteDenied) as caught:
        second.write(ref, "second", cas=0)

    assert "already holds a secret" in caught.value.message
    assert root_read(bao, ref)["data"] == {SECRET_KEY: "first"}


def test_cas_conflict_with_a_token_that_may_update_is_secret_exists(policies):
    bao = policies
    ref = new_ref()
    client = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao, READ_WRITE))
    assert client.write(ref, "first", cas=0) == 1

    with pytest.raises(SecretExists):
        client.write(ref, "second", cas=0)
    assert client.write(ref, "second", cas=1) == 2  # what rotate does: replace the version it read
    assert client.read(ref).value == "second"


def test_token_without_create_gets_a_clear_message(policies):
    bao = policies
    ref = new_ref()
    client = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao, READ_POLICY))

    assert "create" not in client.capabilities(ref)
    with pytest.raises(VaultWriteDenied) as caught:
        client.write(ref, "value", cas=0)
    assert f"{ref.mount}/{ref.path}" in caught.value.message and "may not write" in caught.value.message
    assert bao.request("GET", ref.data_path, ok=(404,)).status_code == 404


def test_read_only_token_reads_what_was_written(policies):
    bao = policies
    ref = new_ref()
    VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao)).write(ref, "stored", cas=0)

    reader = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao, READ_POLICY))
    secret = reader.read(ref)

    assert (secret.value, secret.version) == ("stored", 1)
    assert reader.holds(ref, "stored") and not reader.holds(ref, "other")
    assert "stored" not in repr(secret)


def test_write_only_token_cannot_read_back(policies):
    bao = policies
    ref = new_ref()
    client = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao))
    client.write(ref, "value", cas=0)

    with pytest.raises(VaultDenied):
        client.read(ref)


def test_kv_v1_when_asked(policies):
    bao = policies
    ref = new_ref(kv_version=1)
    client = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao))

    assert client.write(ref, "v1 value", cas=0) is None
    assert root_read(bao, ref) == {SECRET_KEY: "v1 value"}


def test_missing_secret_is_not_found(policies):
    bao = policies
    reader = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao, READ_POLICY))
    with pytest.raises(SecretNotFound):
        reader.read(new_ref())


def test_delete_metadata_removes_every_version(policies):
    bao = policies
    ref = new_ref()
    VaultClient(bao.url, token="root", timeout=5, allow_http=True).write(ref, "doomed", cas=0)

    VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao, DELETE)).delete_metadata(ref)

    assert bao.request("GET", ref.metadata_path, ok=(404,)).status_code == 404


def test_used_wrapping_token_is_invalid_and_not_in_the_message(policies):
    bao = policies
    wrapping = dashboard_wrapping_token(bao)
    VaultClient(bao.url, timeout=5, allow_http=True).unwrap(wrapping)

    with pytest.raises(WrappingTokenInvalid) as caught:
        VaultClient(bao.url, timeout=5, allow_http=True).unwrap(wrapping)
    assert wrapping not in str(caught.value)


def test_environment_proxy_and_vault_token_are_ignored(policies, monkeypatch, closed_port_url, tmp_path):
    bao = policies
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, closed_port_url)
    monkeypatch.setenv("VAULT_TOKEN", "root")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".vault-token").write_text("root")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    client = VaultClient(bao.url, timeout=5, allow_http=True).unwrap(dashboard_wrapping_token(bao))  # reached bao: no proxy used
    client.revoke_self()
    with pytest.raises(VaultError, match="no Vault token"):
        client.read(new_ref())  # neither VAULT_TOKEN nor ~/.vault-token stands in


def test_vault_down_is_unreachable(closed_port_url):
    started = time.monotonic()
    with pytest.raises(VaultUnreachable, match="cannot be reached"):
        VaultClient(closed_port_url, timeout=5, allow_http=True).unwrap("hvs.wrapping")
    assert time.monotonic() - started < 3


def test_silent_server_times_out(silent_server_url):
    started = time.monotonic()
    with pytest.raises(VaultUnreachable, match="did not answer within 1 s"):
        VaultClient(silent_server_url, timeout=1, allow_http=True).unwrap("hvs.wrapping")
    assert time.monotonic() - started < 4


def test_self_signed_certificate_is_refused_by_default(self_signed_server):
    with pytest.raises(VaultUnreachable, match="could not be verified"):
        VaultClient(self_signed_server.url, timeout=5).unwrap("hvs.wrapping")


def test_self_signed_certificate_is_accepted_with_its_ca_bundle(self_signed_server):
    # The TLS handshake succeeds; the stand-in server's `{}` then holds no token.
    with pytest.raises(WrappingTokenInvalid, match="does not wrap a Vault token"):
        VaultClient(self_signed_server.url, ca_bundle=self_signed_server.ca_bundle, timeout=5).unwrap("hvs.wrapping")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict] = []
    redirect_to = ""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(dict(self.headers))
        if self.redirect_to:
            self.send_response(307)
            self.send_header("Location", self.redirect_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_redirect_is_not_followed_and_the_token_goes_nowhere_else():
    class Target(_Recorder):
        seen = []

    class Redirector(_Recorder):
        seen = []

    target = _serve(Target)
    Redirector.redirect_to = f"http://127.0.0.1:{target.server_address[1]}"
    redirector = _serve(Redirector)
    try:
        with pytest.raises(VaultError, match="redirect") as caught:
            VaultClient(f"http://127.0.0.1:{redirector.server_address[1]}", timeout=5, allow_http=True).unwrap("hvs.secret-wrapping")
    finally:
        redirector.shutdown()
        target.shutdown()
    assert len(Redirector.seen) == 1 and Target.seen == []
    assert "hvs.secret-wrapping" not in str(caught.value)


def test_repr_hides_the_token(policies):
    client = VaultClient(policies.url, token="hvs.very-secret", timeout=5, allow_http=True)
    assert repr(client) == f"VaultClient({policies.url!r}, token=set)"
    assert repr(VaultClient(policies.url, timeout=5, allow_http=True)) == f"VaultClient({policies.url!r}, token=none)"


@contextlib.contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """One connection: reads the whole request, then `answer(conn)` writes what it likes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:  # the whole request first: closing on unread bytes would send a reset instead
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            declared = re.search(rb"(?i)content-length: *(\d+)", head)
            while len(body) < (int(declared.group(1)) if declared else 0):
                body += conn.recv(65536)
            with contextlib.suppress(OSError):
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize("declared", [100, 1024 * 1024])
def test_answer_cut_off_midway_is_unreachable_not_a_crash(declared):
    """A write whose answer is cut off may or may not have landed: setup must see 'unreachable'."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % declared
    with raw_server(lambda conn: conn.sendall(head + b'{"data"')) as url, pytest.raises(VaultUnreachable) as failed:
        VaultClient(url, token="hvs.t", timeout=5, allow_http=True).write(new_ref(), "v", cas=0)
    assert failed.value.message == f"Vault at {url} cannot be reached (write secret): IncompleteRead"


def endless(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    while True:
        conn.sendall(b"x" * 65536)


def test_an_endless_answer_without_a_length_is_read_to_one_byte_past_one_mib_and_refused():
    with raw_server(endless) as url, Deadline(5) as deadline:
        status, raw = request("GET", f"{url}/v1/x", deadline=deadline, timeout=5, tls=None, headers={})
    assert (status, len(raw)) == (200, 1024 * 1024 + 1)

    with raw_server(endless) as url, pytest.raises(VaultError) as refused:
        VaultClient(url, token="hvs.t", timeout=5, allow_http=True).read(REF)
    assert refused.value.message == f"Vault at {url} sent more than 1048576 bytes (read secret)"


@pytest.mark.parametrize(("status", "refused"), [(299, False), (300, True), (399, True), (400, False)])
def test_request_refuses_every_3xx_answer(local_server, status, refused):
    server = local_server(lambda seen, body: (status, {"Location": "http://127.0.0.1:1/"}, b"{}"))
    url = f"{server.url}/v1/x"
    with Deadline(5) as deadline:
        if refused:
            with pytest.raises(RedirectRefused) as caught:
                request("GET", url, deadline=deadline, timeout=5, tls=None, headers={})
            assert str(caught.value) == f"{url} answered {status}"
        else:
            assert request("GET", url, deadline=deadline, timeout=5, tls=None, headers={}) == (status, b"{}")


def test_create_wrapped_token_is_made_at_token_create_with_the_policy_and_wrap_ttl(policies):
    """luksctl-client open's wrapping token, as the dashboard makes it: the front end checks where it was made."""
    bao = policies
    token = VaultClient(bao.url, token=ROOT_TOKEN, timeout=5, allow_http=True).create_wrapped_token(READ_POLICY, "123s")

    lookup = bao.request("POST", "sys/wrapping/lookup", json={"token": token}).json()["data"]
    assert (lookup["creation_path"], lookup["creation_ttl"]) == ("auth/token/create", 123)
    assert bao.unwrap(token)["auth"]["policies"] == ["default", READ_POLICY]
    assert not bao.lookup_wrapping(token), "single use"


@pytest.mark.parametrize("answer", [{"auth": {"client_token": "not wrapped"}}, {"wrap_info": {"token": ""}}])
def test_create_wrapped_token_refuses_an_answer_without_one(local_server, answer):
    server = local_server(lambda seen, body: json_answer(answer))

    with pytest.raises(VaultError) as refused:
        VaultClient(server.url, token="the user's", timeout=5, allow_http=True).create_wrapped_token(READ_POLICY, "300s")

    assert refused.value.message == f"Vault at {server.url} created no wrapping token (no wrap_info.token in its answer)"
    (seen,) = server.seen
    assert (seen.method, seen.path, seen.headers["x-vault-wrap-ttl"]) == ("POST", "/v1/auth/token/create", "300s")


def test_delete_on_kv1_deletes_the_secret_itself(policies):
    """KV v1 keeps no metadata: its DELETE goes to the data path."""
    bao = policies
    ref = new_ref(kv_version=1)
    client = VaultClient(bao.url, token=ROOT_TOKEN, timeout=5, allow_http=True)
    client.write(ref, "to be deleted", cas=None)

    client.delete_metadata(ref)

    with pytest.raises(SecretNotFound):
        client.read(ref)


@pytest.mark.parametrize(("status", "error"), [(200, None), (204, None), (500, "failed during delete secret"),
                                               (403, "the token may not delete")])
def test_delete_takes_200_and_204_and_names_its_step_in_a_failure(local_server, status, error):
    server = local_server(lambda seen, body: (status, {}, b""))
    client = VaultClient(server.url, token="a token", timeout=5, allow_http=True)
    ref = SecretRef(KV2_ROOT, "a/b/storage_encryption", SECRET_KEY)

    if error is None:
        client.delete_metadata(ref)
    else:
        with pytest.raises(VaultError) as failed:
            client.delete_metadata(ref)
        expected = {500: f"Vault at {server.url} failed during delete secret", 403: f"the token may not delete {ref}"}[status]
        assert failed.value.message == expected
    assert [(seen.method, seen.path) for seen in server.seen] == [("DELETE", f"/v1/{ref.metadata_path}")]


def test_kv_version_is_the_mounts_own_with_the_mount_named_with_slashes_around(policies):
    bao = policies
    mount = f"kv1-{uuid.uuid4().hex[:8]}-X"  # ends in a letter a sloppy strip would cut
    bao.request("POST", f"sys/mounts/{mount}", json={"type": "kv"})  # no version option: v1
    client = VaultClient(bao.url, token=ROOT_TOKEN, timeout=5, allow_http=True)

    assert [client.kv_version(name) for name in (f"/{mount}/", mount, KV1_ROOT, KV2_ROOT)] == [1, 1, 1, 2]


@pytest.mark.parametrize("status", [400, 403, 404])
def test_kv_version_of_a_mount_vault_will_not_describe_is_the_dashboards_v2(local_server, status):
    server = local_server(lambda seen, body: json_answer({"errors": ["no"]}, status))

    assert VaultClient(server.url, token="a token", timeout=5, allow_http=True).kv_version("secrets") == 2
    assert [seen.path for seen in server.seen] == ["/v1/sys/internal/ui/mounts/secrets"]


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_a_wrapping_token_vault_will_not_unwrap_is_invalid(local_server, status):
    server = local_server(lambda seen, body: json_answer({"errors": ["wrapping token is not valid or does not exist"]}, status))

    with pytest.raises(WrappingTokenInvalid) as refused:
        VaultClient(server.url, timeout=5, allow_http=True).unwrap("hvs.used-wrapping-token")

    assert refused.value.message == "the wrapping token is invalid, expired or already used; request a new one from the dashboard"


@pytest.mark.parametrize("auth", [{}, {"client_token": ""}, {"client_token": 7}])
def test_an_unwrapped_answer_without_a_token_is_refused(local_server, auth):
    server = local_server(lambda seen, body: json_answer({"auth": auth}))

    with pytest.raises(WrappingTokenInvalid) as refused:
        VaultClient(server.url, timeout=5, allow_http=True).unwrap("hvs.wraps-data")

    assert refused.value.message == "the wrapping token does not wrap a Vault token (expected auth.client_token)"


def test_a_socket_tracked_after_the_deadline_expired_is_cut_at_once():
    """A connection made as the timer fires would otherwise miss it, and its TLS handshake could trickle on."""
    ours, theirs = socket.socketpair()
    unconnected = socket.socket()
    with ours, theirs, unconnected, Deadline(0.01) as deadline:
        wait_until(lambda: deadline.expired, 5, "the deadline's timer", interval=0.01)
        deadline.track(ours)
        deadline.track(unconnected)  # shutdown fails (not connected): ignored
        ours.settimeout(2)
        assert ours.recv(1) == b""


def test_a_deadline_counts_down_and_is_spent_when_its_time_is_up_even_before_its_timer_fires():
    """`left()` bounds each socket's timeout; past its end it refuses whether or not the timer has run."""
    running = Deadline(30)
    assert 29 < running.left() <= 30
    unstarted = Deadline(0.01)  # its timer never starts: only the clock can say it is spent
    time.sleep(0.02)
    with pytest.raises(DeadlineExceeded) as spent:
        unstarted.left()
    assert str(spent.value) == "the 0.01 s deadline expired"


def test_a_deadline_fires_on_time_from_a_daemon_timer():
    """Under a second too (a `VaultClient` deadline may be 0.1 s), and a pending timer never holds the process's exit."""
    before = set(threading.enumerate())
    with Deadline(0.3) as deadline:
        started = time.monotonic()
        (timer,) = [thread for thread in threading.enumerate() if thread not in before and isinstance(thread, threading.Timer)]
        assert timer.daemon is True
        wait_until(lambda: deadline.expired, 5, "the deadline's timer", interval=0.01)
        assert 0.25 < time.monotonic() - started < 0.9


def test_check_peer_gets_the_servers_der_certificate_and_what_it_raises_ends_the_request(self_signed_server):
    """luksctl-client's pinning: it compares these bytes with the fingerprint it recorded."""
    with open(self_signed_server.ca_bundle) as pem:
        served = ssl.PEM_cert_to_DER_cert(pem.read())
    seen = []
    with Deadline(5) as deadline:
        answer = request("GET", f"{self_signed_server.url}/v1/x", deadline=deadline, timeout=5, tls=tls_context(verify=False),
                         headers={}, check_peer=seen.append)
    assert (seen, answer) == ([served], (200, b"{}"))

    def impostor(der: bytes) -> None:
        raise ssl.SSLError("the certificate is not the one recorded")
    with Deadline(5) as deadline, pytest.raises(ssl.SSLError, match="not the one recorded"):
        request("GET", f"{self_signed_server.url}/v1/x", deadline=deadline, timeout=5, tls=tls_context(verify=False),
                headers={}, check_peer=impostor)


@pytest.mark.parametrize(("url", "dialled"), [("https://vault.example", ("vault.example", 443)),
                                              ("http://vault.example/", ("vault.example", 80)),
                                              ("https://vault.example:8200", ("vault.example", 8200))])
def test_a_url_without_a_port_dials_the_schemes_port(monkeypatch, url, dialled):
    addresses = []

    def refuse(address, *args, **kwargs):
        addresses.append(address)
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(VaultUnreachable):
        VaultClient(url, token="hvs.t", timeout=5, allow_http=True, verify=False).read(new_ref())  # no TLS happens: nothing connects
    assert addresses == [dialled]


def test_request_sends_the_urls_path_with_its_query(local_server):
    server = local_server(lambda seen, body: json_answer({}))
    with Deadline(5) as deadline:
        request("GET", f"{server.url}/v1/sys/mounts?list=true", deadline=deadline, timeout=5, tls=None, headers={})
        request("GET", f"{server.url}/v1/sys/mounts", deadline=deadline, timeout=5, tls=None, headers={})
    assert [seen.path for seen in server.seen] == ["/v1/sys/mounts?list=true", "/v1/sys/mounts"]


def test_a_refused_connection_and_a_silent_vault_say_which_step_and_why(closed_port_url, silent_server_url):
    ref = new_ref()
    with pytest.raises(VaultUnreachable) as refused:
        VaultClient(closed_port_url, token="hvs.t", timeout=5, allow_http=True).read(ref)
    with pytest.raises(VaultUnreachable) as silent:
        VaultClient(silent_server_url, token="hvs.t", timeout=0.3, deadline=5, allow_http=True).read(ref)

    assert refused.value.message == f"Vault at {closed_port_url} cannot be reached (read secret): Connection refused"
    assert silent.value.message == f"Vault at {silent_server_url} did not answer within 0.3 s (read secret)"


@pytest.mark.parametrize(("kv_version", "cas", "or_exists"), [(2, 0, True), (2, 4, False), (2, None, False), (1, None, True)])
def test_a_refused_write_says_the_path_may_hold_a_secret_only_where_a_create_only_policy_can_tell(local_server, kv_version, cas, or_exists):
    """A create-only policy answers 403 to a create on an existing path (cas=0), and to any KV v1 write there."""
    server = local_server(lambda seen, body: json_answer({"errors": ["permission denied"]}, 403))
    ref = new_ref(kv_version=kv_version)

    with pytest.raises(VaultWriteDenied) as refused:
        client_of(server).write(ref, "v", cas=cas)

    assert refused.value.message == (f"Vault refused to write {ref}: the token may not write this path"
                                     + (", or (with a create-only policy) the path already holds a secret" if or_exists else ""))


REF = SecretRef(KV2_ROOT, "a/b/storage_encryption", SECRET_KEY)


@pytest.mark.parametrize(("answer", "capabilities"), [
    ({REF.data_path: ["read"], "capabilities": ["read"]}, {"read"}),  # what Vault sends
    ({REF.data_path: ["read"]}, {"read"}),
    ({"capabilities": ["update"]}, {"update"}),
    ({}, set()),
    ({"capabilities": "root"}, set()),  # not a list: nothing is assumed
])
def test_capabilities_are_read_from_the_paths_key_or_the_summary(local_server, answer, capabilities):
    server = local_server(lambda seen, body: json_answer(answer))
    assert client_of(server).capabilities(REF) == capabilities


@pytest.mark.parametrize(("call", "status", "answer", "error", "message"), [
    ("capabilities", 403, {}, VaultDenied, "Vault at {url} refused the capabilities lookup: permission denied"),
    ("capabilities", 401, {}, VaultDenied, "Vault at {url} refused the capabilities lookup: permission denied"),
    ("read", 401, {}, VaultDenied, "the token may not read secrets/a/b/storage_encryption; check its Vault policy"),
    ("read", 404, {}, SecretNotFound, "no secret at secrets/a/b/storage_encryption (KV v2) at {url}"),
    ("write", 400, {"errors": ["check-and-set parameter did not match the current version"]}, SecretExists,
     "{ref} already holds a secret (version is not 0); it was not overwritten"),
    ("write", 400, {"errors": ["no data provided"]}, VaultError, "Vault refused the write to {ref}: no data provided"),
    ("write", 400, {}, VaultError, "Vault refused the write to {ref}: bad request"),
    ("write", 200, {"data": {}}, VaultError, "Vault accepted the write to {ref} but did not report its version"),
    ("create", 500, {}, VaultUnreachable, "Vault at {url} failed during token create"),
])
def test_each_refusal_of_a_call_says_what_and_where(local_server, call, status, answer, error, message):
    server = local_server(lambda seen, body: json_answer(answer, status))
    client = client_of(server)
    calls = {"capabilities": lambda: client.capabilities(REF), "read": lambda: client.read(REF), "write": lambda: client.write(REF, "v", cas=0),
             "create": lambda: client.create_wrapped_token(READ_POLICY, "300s")}

    with pytest.raises(error) as refused:
        calls[call]()

    assert type(refused.value) is error and refused.value.message == message.format(url=server.url, ref=REF)


def test_slashes_around_the_mount_and_path_are_dropped():
    ref = SecretRef("/secrets/", "/sub/x@y/", SECRET_KEY)
    assert (ref.data_path, ref.metadata_path) == ("secrets/data/sub/x@y", "secrets/metadata/sub/x@y")
    assert SecretRef("/X-kv/", "/a/bX/", SECRET_KEY, 1).data_path == "X-kv/a/bX"  # only slashes


@pytest.mark.parametrize(("kv_version", "answer", "stored"), [
    (2, {"data": {"data": {SECRET_KEY: "p"}, "metadata": {"version": 3}}}, ("p", 3)),
    (2, {"data": {"data": {SECRET_KEY: "p"}, "metadata": {"version": "3"}}}, ("p", None)),  # not a number: unknown
    (1, {"data": {SECRET_KEY: "p", "metadata": {"version": 3}}}, ("p", None)),  # KV v1 keeps no versions, whatever the secret holds
])
def test_read_takes_the_version_only_from_kv_v2s_metadata(local_server, kv_version, answer, stored):
    server = local_server(lambda seen, body: json_answer(answer))
    ref = SecretRef(KV2_ROOT if kv_version == 2 else KV1_ROOT, "a/b/storage_encryption", SECRET_KEY, kv_version)

    secret = client_of(server).read(ref)

    assert (secret.value, secret.version) == stored


@pytest.mark.parametrize("data", [[SECRET_KEY], {SECRET_KEY: ""}, {SECRET_KEY: 7}, {"other": "p"}])
def test_a_secret_without_a_non_empty_string_at_its_key_is_not_found(local_server, data):
    server = local_server(lambda seen, body: json_answer({"data": {"data": data}}))

    with pytest.raises(SecretNotFound) as missing:
        client_of(server).read(REF)

    assert missing.value.message == f"the secret {REF.where} has no non-empty key {SECRET_KEY!r}"


PATH_RULE = "must be non-empty '/'-separated names without '..' or spaces"


@pytest.mark.parametrize(("mount", "path", "key", "kv_version", "message"), [
    ("", "a/b", "k", 2, f"the secret mount '' {PATH_RULE}"),
    ("sec rets", "a/b", "k", 2, f"the secret mount 'sec rets' {PATH_RULE}"),
    ("secrets", "a/../b", "k", 2, f"the secret path 'a/../b' {PATH_RULE}"),
    ("secrets", "a/./b", "k", 2, f"the secret path 'a/./b' {PATH_RULE}"),
    ("secrets", "a//b", "k", 2, f"the secret path 'a//b' {PATH_RULE}"),
    ("secrets", "a/b\tc", "k", 2, f"the secret path 'a/b\\tc' {PATH_RULE}"),
    ("secrets", "a/b\x01", "k", 2, f"the secret path 'a/b\\x01' {PATH_RULE}"),
    ("secrets", "/", "k", 2, f"the secret path '/' {PATH_RULE}"),
    ("secrets", "a/b", "", 2, "the secret key must be non-empty"),
    ("secrets", "a/b", "k", 3, "kv_version must be 1 or 2"),
])
def test_a_secret_ref_refuses_what_vault_would_misread(mount, path, key, kv_version, message):
    with pytest.raises(ValueError) as refused:
        SecretRef(mount, path, key, kv_version)
    assert str(refused.value) == message


def test_a_secret_ref_takes_the_characters_dashboards_use():
    ref = SecretRef("/secrets/", "sub-1_a.b~c@d+e=f:g,h/storage_encryption/", "storage_encryption_key", 1)
    assert ref.data_path == "secrets/sub-1_a.b~c@d+e=f:g,h/storage_encryption"
    assert str(ref) == "secrets/sub-1_a.b~c@d+e=f:g,h/storage_encryption (key 'storage_encryption_key', KV v1)"
    assert SecretRef("X", "X/Y", "k").data_path == "X/data/X/Y"


@pytest.mark.parametrize("url", ["ftp://vault.example:8200", "https://", "https://user@vault.example", "https://vault.example?x=1",
                                 "https://vault.example#f", "vault.example:8200"])
def test_a_vault_url_that_is_not_one_is_refused(url):
    with pytest.raises(VaultError) as refused:
        VaultClient(url)
    assert refused.value.message == f"the Vault URL {url!r} must look like https://vault.example:8200"


def test_plain_http_is_refused_unless_allowed():
    with pytest.raises(PlainHttpRefused) as refused:
        VaultClient("http://vault.example:8200")
    assert refused.value.message == "the Vault URL http://vault.example:8200 is plain http://: a token would cross the network unencrypted; use https://"
    assert VaultClient("http://vault.example:8200/", allow_http=True).url == "http://vault.example:8200"
    assert VaultClient("http://X/", allow_http=True).url == "http://X"


@pytest.mark.parametrize(("timeout", "deadline", "accepted"), [
    (600, None, True), (0.1, 600, True), (0, None, False), (0, 5, False), (600.5, None, False), (600.5, 5, False), (10, 0, False),
    (10, 601, False), (-1, 5, False),
])
def test_timeouts_are_bounded_to_600_seconds(timeout, deadline, accepted):
    if accepted:
        client = VaultClient("http://vault.example", timeout=timeout, deadline=deadline, allow_http=True)
        assert (client.timeout, client.deadline) == (timeout, timeout if deadline is None else deadline)
    else:
        with pytest.raises(VaultError) as refused:
            VaultClient("http://vault.example", timeout=timeout, deadline=deadline, allow_http=True)
        assert refused.value.message == "the Vault timeout must be between 0 and 600 seconds"


@pytest.mark.parametrize(("status", "payload", "error", "message"), [
    (503, b"{}", VaultUnreachable, "Vault at {url} is sealed or not initialised (read secret)"),
    (500, b'{"errors": ["internal"]}', VaultUnreachable, "Vault at {url} failed during read secret"),
    (502, b"", VaultUnreachable, "Vault at {url} failed during read secret"),
    (504, b"", VaultUnreachable, "Vault at {url} failed during read secret"),
    (429, b"{}", VaultUnreachable, "Vault at {url} is rate limiting us (read secret); try again later"),
    (418, b'{"errors": ["teapot", "short"]}', VaultError, "Vault at {url} answered the read secret with HTTP 418: teapot; short"),
    (405, b"{}", VaultError, "Vault at {url} answered the read secret with HTTP 405: no detail"),
    (200, b"[1, 2]", VaultError, "Vault at {url} gave an answer that is not Vault's JSON (read secret)"),
    (200, b"x" * (1024 * 1024 + 1), VaultError, "Vault at {url} sent more than 1048576 bytes (read secret)"),
])
def test_each_answer_vault_should_not_give_is_named_with_its_step(local_server, caplog, status, payload, error, message):
    server = local_server(lambda seen, body: (status, {"Content-Type": "application/json"}, payload))

    with caplog.at_level("WARNING", logger="luksctl.vault"), pytest.raises(error) as failed:
        client_of(server).read(REF)

    assert type(failed.value) is error and failed.value.message == message.format(url=server.url)
    if status in (500, 502, 504):  # the operator's log gets Vault's own words
        assert caplog.messages == [f"Vault at {server.url} failed during read secret: HTTP {status} {'internal' if status == 500 else ''}"]
    if payload == b"[1, 2]":
        assert caplog.messages == [f"Vault at {server.url} answered the read secret with no JSON object"]


def test_each_request_says_it_is_vaults_and_sends_json_and_the_token_only_when_there_is_one(local_server):
    bodies = []

    def respond(seen, body):
        bodies.append(body)
        return json_answer({"data": {"creation_path": "auth/token/create", "data": {SECRET_KEY: "p"}}, "capabilities": ["read"]})

    server = local_server(respond)
    client = VaultClient(server.url, token="hvs.ours", timeout=5, allow_http=True)
    client.wrapping_lookup("hvs.wrapping")
    client.capabilities(REF)
    client.read(REF)

    lookup, capabilities, read = server.seen
    assert (lookup.headers["x-vault-request"], lookup.headers["content-type"], "x-vault-token" in lookup.headers) == ("true", "application/json", False)
    assert (capabilities.headers["x-vault-token"], capabilities.headers["content-type"]) == ("hvs.ours", "application/json")
    assert [json.loads(body) for body in bodies[:2]] == [{"token": "hvs.wrapping"}, {"paths": [REF.data_path]}]
    assert (bodies[2], "content-type" in read.headers) == (b"", False)  # a GET carries no body


def test_a_call_without_a_token_is_refused_before_anything_is_sent(local_server):
    server = local_server(lambda seen, body: json_answer({}))
    with pytest.raises(VaultError) as refused:
        VaultClient(server.url, timeout=5, allow_http=True).read(REF)
    assert refused.value.message == "no Vault token for the read secret" and server.seen == []


def test_each_request_is_timed_for_the_caller_with_its_step(local_server):
    server = local_server(lambda seen, body: json_answer({"data": {"data": {SECRET_KEY: "p"}}}))
    timed = []
    client = VaultClient(server.url, token="hvs.t", timeout=5, allow_http=True, on_request=lambda step, seconds: timed.append((step, seconds)))

    client.read(REF)
    client.read(REF)

    assert [step for step, _ in timed] == ["read secret", "read secret"] and all(0 < seconds < 5 for _, seconds in timed)


def test_once_the_deadline_is_spent_no_further_request_is_sent(local_server):
    """Only the revoke gets a grace period; every other call after the deadline fails at once."""
    server = local_server(lambda seen, body: json_answer({}))
    server.trickle = lambda seen: 1.0  # a byte a second: the 0.3 s deadline strikes mid-answer
    client = VaultClient(server.url, token="hvs.t", timeout=5, deadline=0.3, allow_http=True)

    with pytest.raises(VaultUnreachable):
        client.read(REF)
    with pytest.raises(VaultUnreachable) as spent:
        client.read(REF)

    assert spent.value.message == f"Vault at {server.url} did not answer within 0.3 s (read secret)"
    assert len(server.seen) == 1


def test_each_request_is_logged_at_debug_with_its_step_and_time_left_and_no_token(local_server, caplog):
    server = local_server(lambda seen, body: json_answer({"data": {"data": {SECRET_KEY: "the passphrase"}}}))

    with caplog.at_level("DEBUG", logger="luksctl.vault"):
        VaultClient(server.url, token="hvs.secret-token", timeout=5, allow_http=True).read(REF)

    assert caplog.messages == [f"Vault at {server.url}: GET /v1/{REF.data_path} (read secret), 5.0 s left"]


def test_a_redirect_is_refused_and_logged_with_its_step(local_server, caplog):
    server = local_server(lambda seen, body: (307, {"Location": "http://127.0.0.1:1/v1/elsewhere"}, b""))

    with caplog.at_level("WARNING", logger="luksctl.vault"), pytest.raises(VaultError) as refused:
        client_of(server).read(REF)

    assert refused.value.message == f"Vault at {server.url} answered with a redirect; redirects are not followed"
    assert caplog.messages == [f"Vault at {server.url} answered the read secret with a redirect; not followed"]


def test_the_deadline_is_shared_by_every_call_of_a_client(local_server):
    """Each answer takes 0.4 s: two fit in the 1 s deadline, and the third gets what is left."""
    def slow(seen, body):
        time.sleep(0.4)
        return json_answer({"data": {"data": {SECRET_KEY: "p"}}})

    server = local_server(slow)
    client = VaultClient(server.url, token="hvs.t", timeout=5, deadline=1, allow_http=True)
    client.read(REF)
    client.read(REF)

    with pytest.raises(VaultUnreachable) as late:
        client.read(REF)
    assert late.value.message == f"Vault at {server.url} did not answer within 1 s (read secret)"


def test_an_answer_of_exactly_the_size_limit_is_read(local_server):
    answer = {"data": {"data": {SECRET_KEY: "p"}}, "pad": ""}
    answer["pad"] = "x" * (1024 * 1024 - len(json.dumps(answer)))
    server = local_server(lambda seen, body: (200, {}, json.dumps(answer).encode()))

    assert client_of(server).read(REF).value == "p"
