"""The proxy as shipped: nginx with the configuration `luksctl-api proxy-config` writes, in front
of gunicorn with deploy/gunicorn.conf.py on a Unix socket, both real, on loopback.

ALLOWED and ALSO_ALLOWED are in ALLOWED_CLIENTS, REFUSED is not (support/raw_http.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.net import free_port
from support.raw_http import ALLOWED, ALSO_ALLOWED, NGINX_ANSWERS, OPEN_HEAD, REFUSED, STATUS, connect, exchange, get
from support.serving import NGINX, PROXY_USER, installed, running_stack
from support.waiting import wait_until

from luksctl.api import proxy
from luksctl.api.admin import main_frontend, main_worker
from luksctl.errors import EXIT_CONFIG



@pytest.fixture(scope="module")
def stack():
    with running_stack("luksctl-proxy-test.") as stack:
        yield stack


@pytest.mark.parametrize("case", sorted(NGINX_ANSWERS))
def test_every_answer_nginx_makes_itself_is_json_with_the_state_and_an_error(stack, case):
    request, expected, source, tls = NGINX_ANSWERS[case]

    status, body = exchange(stack.port, request, source, tls)

    assert status == expected
    assert body["volume_state"] == "unavailable" and body["error"]


def test_the_refusal_names_the_address_and_the_setting(stack):
    _, body = exchange(stack.port, get(STATUS), REFUSED)

    assert body["error"] == f"client address {REFUSED} is not in ALLOWED_CLIENTS"


def test_an_allowed_client_reaches_the_app_through_the_socket(stack):
    status, body = exchange(stack.port, get(STATUS))

    assert status == 200 and body["volume_state"] == "unavailable" and "none.ini" in body["error"]  # the app's own answer


def test_a_refused_address_is_answered_before_its_body_arrives(stack):
    """The refusal comes after the head: a body that never comes costs nothing."""
    with connect(stack.port, REFUSED) as sock:
        started = time.monotonic()
        sock.sendall(OPEN_HEAD + b"Content-Length: 10000\r\n\r\n")
        first = sock.recv(65536)
        waited = time.monotonic() - started

    assert first.startswith(b"HTTP/1.1 403 ") and waited < proxy.CLIENT_TIMEOUT / 2


def audit_clients(log: Path) -> list[str]:
    return [json.loads(line)["client"] for line in log.read_text().splitlines() if line.startswith('{"audit"')]


@pytest.mark.parametrize("header", ["X-Forwarded-For: 10.1.2.3", "X-Real-IP: 10.1.2.3", "Forwarded: for=10.1.2.3",
                                    f"X-Forwarded-For: {ALLOWED}"])
def test_a_client_sent_forwarding_header_changes_nothing(stack, header):
    before = len(audit_clients(stack.gunicorn_log))

    audited = OPEN_HEAD + f"{header}\r\nContent-Length: 2\r\n\r\n{{}}".encode()  # status polls are not audited
    allowed_status, _ = exchange(stack.port, audited, ALSO_ALLOWED)
    refused_status, _ = exchange(stack.port, audited, REFUSED)

    assert (allowed_status, refused_status) == (400, 403)
    wait_until(lambda: len(audit_clients(stack.gunicorn_log)) > before, 10, "the audit line", interval=0.1)
    assert audit_clients(stack.gunicorn_log)[before:] == [ALSO_ALLOWED]


def test_past_the_requests_in_progress_one_address_may_have_the_next_gets_429(stack):
    with ExitStack() as held:
        for _ in range(proxy.CONNECTIONS_PER_CLIENT):
            sock = held.enter_context(connect(stack.port, ALSO_ALLOWED))
            sock.sendall(OPEN_HEAD + b"Content-Length: 100\r\n\r\n{")  # in progress: the body trickles
        time.sleep(0.5)  # nginx counts a request once its head is read

        status, body = exchange(stack.port, get(STATUS), ALSO_ALLOWED)
        other_status, _ = exchange(stack.port, get(STATUS), ALLOWED)

    assert status == 429 and f"at most {proxy.CONNECTIONS_PER_CLIENT}" in body["error"]
    assert other_status == 200  # the limit is per address


def test_502_in_json_when_gunicorn_is_not_running(stack):
    port = free_port()
    stack.start_proxy("nginx-no-upstream", stack.directory / "no-such.sock", port)

    status, body = exchange(port, get(STATUS))

    assert status == 502 and "not running" in body["error"]


# --- the generated configuration ------------------------------------------------------------

def render(tmp_path: Path, config: dict, main=main_frontend, *extra: str) -> tuple[int, str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "nginx.conf"
    os.environ["LUKSCTL_API_CONFIG"] = str(path)
    try:
        code = main(["proxy-config", "--output", str(out), "--user", PROXY_USER, "--runtime-dir", str(tmp_path), *extra])
    finally:
        del os.environ["LUKSCTL_API_CONFIG"]
    return code, out.read_text() if out.exists() else ""


def test_without_a_certificate_the_proxy_refuses_unless_plain_http_is_allowed(tmp_path, capsys):
    missing = ["--cert", str(tmp_path / "no-cert.pem"), "--key", str(tmp_path / "no-key.pem")]

    code, _ = render(tmp_path, {}, main_frontend, *missing)
    assert code == EXIT_CONFIG and "refusing to serve plain HTTP" in capsys.readouterr().err

    code, text = render(tmp_path, {"ALLOW_PLAIN_HTTP": True}, main_frontend, *missing)
    assert code == 0 and re.search(r"listen 0\.0\.0\.0:5000;", text) and "ssl_certificate" not in text


def test_allowed_clients_come_from_config_json_and_none_means_no_rule(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("")
    files = ["--cert", str(cert), "--key", str(cert)]

    _, listed = render(tmp_path, {"ALLOWED_CLIENTS": ["10.0.0.0/8", "192.0.2.7/32"]}, main_frontend, *files)
    _, open_to_all = render(tmp_path, {}, main_frontend, *files)

    assert re.findall(r"allow (\S+);|deny (\S+);", listed) == [("10.0.0.0/8", ""), ("192.0.2.7/32", ""), ("", "all")]
    assert "allow " not in open_to_all and "deny " not in open_to_all


def test_the_worker_proxy_answers_with_nfs_state_and_passes_nginx_t(tmp_path, stack):
    code, text = render(tmp_path, {"NFS_MOUNTPOINT_LIST": ["/home"]}, main_worker, "--cert", str(stack.cert), "--key", str(stack.key))

    assert code == 0 and '"nfs_state": "unavailable"' in text and "volume_state" not in text
    assert "/run/luksctl-api-wn/gunicorn.sock" in text
    conf = tmp_path / "nginx.conf"
    subprocess.run([NGINX, "-t", "-q", "-c", str(conf)], check=True)


def test_every_code_nginx_may_answer_has_a_json_page(stack):
    text = (stack.directory / "nginx.conf").read_text()

    pages = {int(code) for code in re.findall(r"error_page (\d+) ", text)}

    assert pages == set(proxy.ERRORS)


def test_proxy_config_as_in_exec_start_pre_creates_no_metric_files(tmp_path):
    """Root renders the proxy's configuration under the service's environment: importing the
    app's metrics there would leave root-owned files in the workers' multiprocess directory."""
    multiproc = tmp_path / "metrics"
    multiproc.mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ALLOW_PLAIN_HTTP": True}))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc), "LUKSCTL_API_CONFIG": str(config)}

    subprocess.run([installed("luksctl-api"), "proxy-config", "--output", str(tmp_path / "nginx.conf"),
                    "--user", PROXY_USER, "--runtime-dir", str(tmp_path)], env=env, check=True)

    assert (tmp_path / "nginx.conf").exists() and list(multiproc.iterdir()) == []


def test_a_head_nginx_lets_through_reaches_the_app_whole(stack):
    """gunicorn's own head limits (deploy/gunicorn.conf.py) must not be tighter than nginx's: 150
    short fields fit nginx's 17 KiB but not gunicorn's default of 100 fields."""
    fields = [f"X-Field-{n}: {n}" for n in range(150)]

    status, body = exchange(stack.port, get(STATUS, *fields))

    assert status == 200 and "none.ini" in body["error"]  # the app's own answer
