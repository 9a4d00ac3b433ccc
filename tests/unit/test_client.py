"""luksctl-client against the front end as deployed (support.serving: real nginx and gunicorn,
with the fake bridge), run as a user runs it: the installed script, in a process of its own."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from support.net import free_port
from support.serving import running_stack
from support.waiting import wait_until

from luksctl.api.admin import main_frontend
from luksctl.client import cli
from luksctl.client.pinning import fingerprint
from luksctl.client.transport import parse_target

CLIENT = Path(sys.executable).parent / "luksctl-client"
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def stack():
    """One gunicorn behind two nginx ports: two hosts for the client."""
    with running_stack("luksctl-client-test.", fake_volume=True, nginx_ports=2) as stack:
        stack.second_port = stack.ports[1]
        yield stack


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def client(*argv: str, known_hosts: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLIENT), "--known-hosts", str(known_hosts), *argv], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def known_hosts(tmp_path) -> Path:
    return tmp_path / "config" / "known_hosts"


@pytest.fixture
def other_cert(tmp_path) -> tuple[Path, Path]:
    """Another key, the same names: what an impersonator with a self-made certificate presents."""
    cert, key = tmp_path / "other-cert.pem", tmp_path / "other-key.pem"
    assert main_frontend(["gen-cert", "--cert", str(cert), "--key", str(key), "--hostname", "localhost"]) == 0
    return cert, key


MOUNTED_BODY = b'{"volume_state": "mounted"}'
MOUNTED_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(MOUNTED_BODY), MOUNTED_BODY))


class RecordingTlsServer:
    """Accepts TLS connections with `cert` and keeps every byte a client sends after the handshake."""

    def __init__(self, cert: Path, key: Path):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.handshakes = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            with raw:
                raw.settimeout(10)
                try:
                    with self.context.wrap_socket(raw, server_side=True) as conn:
                        self.handshakes += 1
                        data = b""
                        while chunk := conn.recv(65536):
                            data += chunk
                            if b"\r\n\r\n" in data:
                                conn.sendall(MOUNTED_ANSWER)
                                break
                        self.received.append(data)
                except (OSError, ssl.SSLError):
                    self.received.append(b"")

    def close(self) -> None:
        self.listener.close()


# --- status ------------------------------------------------------------------------------------


def test_status_of_several_hosts_is_an_aligned_table_and_exits_0(stack, known_hosts):
    done = client("status", f"127.0.0.1:{stack.port}", f"127.0.0.1:{stack.second_port}", known_hosts=known_hosts)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["HOST", "VOLUME_STATE", "NFS_STATE", "ERROR"]
    assert [line.split() for line in lines[1:]] == [[f"127.0.0.1:{port}", "unmounted", "-", "-"] for port in (stack.port, stack.second_port)]
    assert len({line.index("VOLUME_STATE") if i == 0 else line.index("unmounted") for i, line in enumerate(lines)}) == 1


def test_status_json_lists_each_host_with_its_state(stack, known_hosts):
    done = client("status", "--json", f"127.0.0.1:{stack.port}", f"localhost:{stack.second_port}", known_hosts=known_hosts)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"host": f"127.0.0.1:{stack.port}", "volume_state": "unmounted"},
                                       {"host": f"localhost:{stack.second_port}", "volume_state": "unmounted"}]


def test_a_host_that_never_answers_is_a_row_with_its_error_at_the_deadline(stack, known_hosts):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP (the backlog), never speaks TLS
        name = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        done = client("status", "--json", "--timeout", "1", name, f"127.0.0.1:{stack.port}", known_hosts=known_hosts)
        took = time.monotonic() - started

    assert done.returncode == 1
    rows = json.loads(done.stdout)
    assert rows[0] == {"host": name, "error": "no answer within 1 s"}
    assert rows[1] == {"host": f"127.0.0.1:{stack.port}", "volume_state": "unmounted"}
    assert took < 5


def test_a_refused_connection_is_a_row_with_its_error(known_hosts):
    done = client("status", f"127.0.0.1:{free_port()}", known_hosts=known_hosts)

    assert done.returncode == 1
    assert "Connection refused" in done.stdout.splitlines()[1]


# --- trust on first use, --ca ------------------------------------------------------------------


def test_first_use_records_the_fingerprint_and_later_uses_accept_it(stack, known_hosts):
    name = f"127.0.0.1:{stack.port}"
    expected = fingerprint(der(stack.cert))

    first = client("status", name, known_hosts=known_hosts)
    second = client("status", name, known_hosts=known_hosts)

    assert first.returncode == 0 and f"recorded {name} in {known_hosts}: SHA256 fingerprint {expected}" in first.stderr
    assert known_hosts.read_text() == f"{name} {expected}\n"
    assert second.returncode == 0 and second.stderr == ""


def test_the_fingerprint_is_openssls(stack):
    openssl = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(stack.cert)], capture_output=True, text=True, check=True)

    assert openssl.stdout.strip().split("=", 1)[1] == fingerprint(der(stack.cert))


def test_another_key_under_a_recorded_name_is_refused_before_anything_is_sent(stack, known_hosts, other_cert):
    impostor = RecordingTlsServer(*other_cert)
    name = f"127.0.0.1:{impostor.port}"
    known_hosts.parent.mkdir(parents=True)
    known_hosts.write_text(f"{name} {fingerprint(der(stack.cert))}\n")  # the real server's, recorded earlier
    try:
        done = client("status", "--json", name, known_hosts=known_hosts)
    finally:
        impostor.close()

    assert done.returncode == 1
    error = json.loads(done.stdout)[0]["error"]
    assert "has changed" in error and fingerprint(der(other_cert[0])) in error and f"luksctl-client forget {name}" in error
    assert impostor.handshakes == 1 and impostor.received == [b""]
    assert known_hosts.read_text() == f"{name} {fingerprint(der(stack.cert))}\n"


def test_forget_then_the_next_use_records_the_new_certificate(stack, known_hosts, other_cert):
    replaced = RecordingTlsServer(*other_cert)
    name = f"127.0.0.1:{replaced.port}"
    known_hosts.parent.mkdir(parents=True)
    known_hosts.write_text(f"{name} {fingerprint(der(stack.cert))}\n")
    try:
        forgotten = client("forget", name, known_hosts=known_hosts)
        left = known_hosts.read_text()
        again = client("status", name, known_hosts=known_hosts)
    finally:
        replaced.close()

    assert forgotten.returncode == 0 and left == ""
    assert again.returncode == 0 and "recorded" in again.stderr
    assert known_hosts.read_text() == f"{name} {fingerprint(der(other_cert[0]))}\n"
    assert replaced.received[0].startswith(b"GET /luksctl_api/v1.0/status HTTP/1.1\r\n")


def test_forget_of_an_unknown_host_says_so(known_hosts):
    done = client("forget", "vm.example", known_hosts=known_hosts)

    assert done.returncode == 1 and f"vm.example:5000 is not in {known_hosts}" in done.stderr


def test_with_the_right_ca_the_server_is_verified_and_nothing_is_recorded(stack, known_hosts):
    done = client("--ca", str(stack.cert), "status", f"127.0.0.1:{stack.port}", f"localhost:{stack.second_port}", known_hosts=known_hosts)

    assert done.returncode == 0, done.stdout + done.stderr
    assert not known_hosts.exists()


def test_with_another_ca_the_server_is_refused(stack, known_hosts, other_cert):
    done = client("--ca", str(other_cert[0]), "status", "--json", f"127.0.0.1:{stack.port}", known_hosts=known_hosts)

    assert done.returncode == 1
    assert json.loads(done.stdout)[0]["error"] == f"its certificate is not trusted by {other_cert[0]}: self-signed certificate"


# --- an Ansible inventory ----------------------------------------------------------------------


def test_every_host_of_an_inventory_is_asked(stack, known_hosts, tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"[front]\nfe ansible_host=127.0.0.1 luksctl_api_port={stack.port}\n"
                         f"[workers]\nlocalhost luksctl_api_port={stack.second_port}\n")
    env = {**os.environ, "PATH": f"{CLIENT.parent}:{os.environ['PATH']}"}

    done = client("status", "--json", "-i", str(inventory), known_hosts=known_hosts, env=env)

    assert done.returncode == 0, done.stderr
    assert [row["host"] for row in json.loads(done.stdout)] == [f"127.0.0.1:{stack.port}", f"localhost:{stack.second_port}"]


def test_without_ansible_an_inventory_is_a_clear_usage_error(known_hosts, tmp_path):
    done = client("status", "-i", str(tmp_path / "hosts.ini"), known_hosts=known_hosts, env={"PATH": "/nonexistent"})

    assert done.returncode == 2
    assert "-i needs ansible-inventory, which is not on PATH" in done.stderr


# --- installs without the server's dependencies ------------------------------------------------


def test_the_base_install_pulls_no_dependency():
    """What pip reads from the installed package's metadata: every dependency needs an extra."""
    requirements = [Requirement(text) for text in importlib.metadata.requires("luksctl")]
    base = [str(r) for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    server = {r.name for r in requirements if r.marker is not None and r.marker.evaluate({"extra": "server"})}

    assert base == []
    assert server == {"flask", "gunicorn", "cryptography", "prometheus_client"}


def test_the_client_runs_on_the_standard_library_alone(stack, known_hosts):
    """-S: no site-packages at all, so flask, cryptography and the rest cannot be imported."""
    program = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from luksctl.client.cli import main; code = main(sys.argv[1:]); "
               "assert not {'flask', 'cryptography', 'prometheus_client', 'requests'} & set(sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", program, str(SRC), "--known-hosts", str(known_hosts),
                           "status", f"127.0.0.1:{stack.port}"], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert "unmounted" in done.stdout


def test_open_says_it_is_still_waiting_until_the_answer_comes(monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(cli, "say", said.append)
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.05)
    answered = threading.Event()
    notice = threading.Thread(target=cli.waiting_notice, args=(parse_target("vm.example"), answered))
    notice.start()
    wait_until(lambda: len(said) >= 3, 10, "three notices", interval=0.01)
    answered.set()
    notice.join(5)
    after_the_answer = len(said)
    time.sleep(0.2)

    assert not notice.is_alive() and len(said) == after_the_answer
    assert said[:3] == [f"still waiting for vm.example:5000 to open the volume ({s:g} s)" for s in (0.05, 0.1, 0.15)]
