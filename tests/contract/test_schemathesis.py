"""Schemathesis against both WSGI apps in-process: >= 1,000 generated cases per service.

Each service gets one Hypothesis run over all its operations (positive data for
every operation, negative data for those that take input), derandomized and
without a deadline, so CI sees the same cases every time. Every case runs to
the end: failures are collected and reported together, each with the exact
request (as curl) that produced it.

Checks per case: no 5xx, status code documented, content type documented,
documented response headers present, body matches its schema, and the body is
a JSON object carrying the state key (`volume_state` / `nfs_state`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import schemathesis
from contract_fakes import ALLOWED_VAULT, CLUSTER_TOKEN, INI, NFS_MOUNTPOINTS, Host
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.net import free_port
from support.raw_http import ALLOWED, ALSO_ALLOWED, NGINX_ANSWERS, exchange
from support.serving import PROXY_USER, Serving, gunicorn_argv, installed

from luksctl import errors
from luksctl.api.frontend import PREFIX as FRONTEND_PREFIX
from luksctl.api.worker import PREFIX as WORKER_PREFIX

EXAMPLES_PER_SERVICE = 1200
MIN_CASES_PER_SERVICE = 1000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,  # what the document forbids, the app refuses (4xx)
]
# A body over 16 KiB refused with 413 is a rejection, too.
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "403", "404", "405", "409", "413", "415", "422", "429", "5xx"]}}}
)
SCHEMA_CHECKS = [check for check in CHECKS if check not in (not_a_server_error, negative_data_rejection)]


def load_served(app, prefix: str):
    """The document the app serves, bound to the app for in-process calls.

    Not `from_wsgi()`: that leaves the schema's own endpoint out of the operations,
    and openapi.json is part of the contract too.
    """
    response = app.test_client().get(f"{prefix}/openapi.json")
    assert response.status_code == 200
    schema = schemathesis.openapi.from_dict(response.get_json(), config=CONFIG)
    schema.app = app
    return schema


def case_strategy(schema) -> st.SearchStrategy:
    """Positive cases for every operation, negative ones where there is input to break."""
    strategies = []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategies.append(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        if operation.method.upper() == "POST":  # the GETs take no input: nothing to make invalid
            strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    return st.one_of(strategies)


def check_state_key(response, state_key: str, case) -> None:
    """PROTOCOL §3: every body, errors included, is JSON carrying the state (the document itself and
    the metrics, Prometheus's text format, excepted)."""
    if case.path == "/metrics" and response.status_code == 200:
        assert response.text.startswith("# HELP luksctl_api_"), f"not the metrics: {response.text[:200]!r}"
        return
    body = json.loads(response.text)
    if case.path.endswith("/openapi.json") and response.status_code == 200:
        assert isinstance(body, dict) and body.get("openapi", "").startswith("3.1"), "openapi.json is not the document"
        return
    assert isinstance(body, dict), f"body is not a JSON object: {response.text[:200]!r}"
    assert state_key in body, f"body has no {state_key!r}: {response.text[:200]!r}"
    assert body[state_key] in ("mounted", "unmounted", "unavailable"), body
    if response.status_code >= 400:
        assert isinstance(body.get("error"), str) and body["error"], f"error body without 'error': {body}"


def fuzz(schema, state_key: str, prepare: Callable[[int, object], None], *, examples: int = EXAMPLES_PER_SERVICE,
         call: Callable = lambda case: case.call(), checks: list = CHECKS) -> tuple[int, dict[str, list[str]], dict]:
    """Run the service's cases, each sent by `call`; returns (count, failures by first line of the
    message, status histogram)."""
    executed = 0
    failures: dict[str, list[str]] = {}
    statuses: dict[tuple[str, int], int] = {}

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
        suppress_health_check=list(HealthCheck),
    )
    # `script` picks the faked host state for the case, so the GETs (which take no input) run in several states.
    @given(script=st.integers(min_value=0, max_value=11), case=case_strategy(schema))
    def run(script, case):
        nonlocal executed
        prepare(script, case)
        response = call(case)
        executed += 1
        key = (f"{case.method} {case.path}", response.status_code)
        statuses[key] = statuses.get(key, 0) + 1
        try:
            case.validate_response(response, checks=checks)
            check_state_key(response, state_key, case)
        except (Exception, FailureGroup) as exc:  # noqa: BLE001 - collected and reported below (FailureGroup is a BaseException)
            message = str(exc).strip()
            first = f"{case.method} {case.path} -> {response.status_code}: {message.splitlines()[0] if message else type(exc).__name__}"
            failures.setdefault(first, []).append(
                # The exact input: the curl line masks token-like fields, so the raw case comes first.
                f"{case.method} {case.path} headers={dict(case.headers or {})!r} media_type={case.media_type!r} body={case.body!r:.2000}\n"
                f"  {case.as_curl_command()[:1000]}\n  response {response.status_code}: {response.text[:300]!r}\n  {message[:600]}"
            )

    run()
    return executed, failures, statuses


def runs_per_operation(schema, statuses: dict) -> dict[str, int]:
    operations = {f"{result.ok().method.upper()} {result.ok().path}" for result in schema.get_all_operations()}
    return {operation: sum(n for (label, _), n in statuses.items() if label == operation) for operation in operations}


def report(service: str, executed: int, failures: dict[str, list[str]], statuses: dict, seconds: float) -> str:
    lines = [f"{service}: {executed} cases in {seconds:.1f} s"]
    lines += [f"  {label} -> {status}: {n}" for (label, status), n in sorted(statuses.items())]
    for first, examples in failures.items():
        lines.append(f"FAILURE x{len(examples)}: {first}\n  first input: {examples[0]}")
    return "\n".join(lines)


def name_the_allowed_vault(script: int, case) -> None:
    """Every third open names the allowed Vault, so the unlock path (fake Vault -> bridge ->
    mounted) runs, not only the 400s."""
    if case.path.endswith("/open") and isinstance(case.body, dict) and script % 3 == 0:
        case.body = {**case.body, "vault_url": ALLOWED_VAULT}


def send_the_cluster_token(script: int, case) -> None:
    """Two cases in three carry the right cluster token; the rest keep the generated (wrong or missing) one -> 403."""
    if case.path.endswith("/nfs-mount") and script % 3 != 0:
        case.headers = {**(case.headers or {}), "X-Luksctl-Token": CLUSTER_TOKEN}


def test_frontend_fuzz(frontend_app, host: Host):
    schema = load_served(frontend_app, FRONTEND_PREFIX)

    def prepare(script: int, case) -> None:
        host.mounted = script % 2 == 1  # scripted state: alternate mounted / unmounted
        name_the_allowed_vault(script, case)

    started = time.monotonic()
    executed, failures, statuses = fuzz(schema, "volume_state", prepare)
    summary = report("frontend", executed, failures, statuses, time.monotonic() - started)
    print(summary)
    assert not failures, summary
    assert executed >= MIN_CASES_PER_SERVICE, summary
    assert min(runs_per_operation(schema, statuses).values()) >= 5, "some operations were barely exercised\n" + summary
    assert host.opens > 0, "the unlock path was never exercised\n" + summary
    # Only the allowed Vault is ever "contacted" (the fake asserts it, too).
    assert set(host.vault_calls) <= {ALLOWED_VAULT}


def test_worker_fuzz(worker_app, host: Host):
    schema = load_served(worker_app, WORKER_PREFIX)

    def prepare(script: int, case) -> None:
        host.nfs_mounted = set(NFS_MOUNTPOINTS[: script % (len(NFS_MOUNTPOINTS) + 1)])  # none, some or all mounted
        send_the_cluster_token(script, case)

    started = time.monotonic()
    executed, failures, statuses = fuzz(schema, "nfs_state", prepare)
    summary = report("worker", executed, failures, statuses, time.monotonic() - started)
    print(summary)
    assert not failures, summary
    assert executed >= MIN_CASES_PER_SERVICE, summary
    assert min(runs_per_operation(schema, statuses).values()) >= 5, "some operations were barely exercised\n" + summary
    assert host.nfs_mounts > 0, "the remount path was never exercised\n" + summary
    assert {status for (label, status) in statuses if label.endswith("/nfs-mount")} >= {200, 403}


# --- Scripted failures: every error the unlock path can raise answers as documented. ---

VALID_OPEN = {
    "vault_url": ALLOWED_VAULT,
    "vault_token": "hvs.CAESIJ-wrapping",
    "secret_root": "secrets",
    "secret_path": "0b2e/4f4e-9a57/storage_encryption",
    "secret_key": "storage_encryption_key",
}
VAULT_ERRORS = [
    errors.WrappingTokenInvalid("already unwrapped", possible_interception=True),
    errors.VaultDenied("denied"),
    errors.SecretNotFound("no secret"),
    errors.VaultUnreachable("down"),
    errors.VaultError("refused"),
]
BRIDGE_ERRORS = [
    errors.WrongPassphrase("wrong passphrase"),
    errors.VolumeBusy("busy"),
    errors.LockTimeout("locked"),
    errors.ActionFailed("docker failed"),
    errors.ConfigError("bad ini"),
    errors.PrivilegedCallFailed("sudo failed"),
    errors.CommandFailed("cryptsetup failed", ["cryptsetup"], 1, "secret stderr"),
    RuntimeError("unexpected"),
]


@pytest.mark.parametrize("error", VAULT_ERRORS + BRIDGE_ERRORS, ids=lambda e: type(e).__name__)
def test_open_errors_conform(frontend_app, host: Host, error):
    schema = load_served(frontend_app, FRONTEND_PREFIX)
    if error in VAULT_ERRORS:
        host.vault_error = error
    else:
        host.open_error = error
    case = schema[f"{FRONTEND_PREFIX}/open"]["POST"].Case(body=VALID_OPEN, media_type="application/json")
    response = case.call()
    expected = getattr(error, "http_status", 500)
    assert response.status_code == expected
    case.validate_response(response, checks=SCHEMA_CHECKS)
    check_state_key(response, "volume_state", case)
    assert "secret stderr" not in response.text and "correct horse" not in response.text


def test_open_body_too_large_and_wrong_media_type_conform(frontend_app, host: Host):
    schema = load_served(frontend_app, FRONTEND_PREFIX)
    operation = schema[f"{FRONTEND_PREFIX}/open"]["POST"]
    for body, media_type, expected in [
        ({**VALID_OPEN, "padding": "x" * 20_000}, "application/json", 413),
        ("vault_url=x", "text/plain", 415),
    ]:
        case = operation.Case(body=body, media_type=media_type)
        response = case.call()
        assert response.status_code == expected, response.text
        case.validate_response(response, checks=SCHEMA_CHECKS)
        check_state_key(response, "volume_state", case)


def test_failed_open_limit_answers_429_with_retry_after(frontend_config, host: Host):
    from luksctl.api import create_frontend_app

    app = create_frontend_app(frontend_config.replace(FAILED_OPEN_LIMIT=1), host)
    schema = load_served(app, FRONTEND_PREFIX)
    operation = schema[f"{FRONTEND_PREFIX}/open"]["POST"]
    bad = {**VALID_OPEN, "vault_url": "https://elsewhere.example"}
    codes = []
    for _ in range(2):
        case = operation.Case(body=bad, media_type="application/json")
        response = case.call()
        codes.append(response.status_code)
        case.validate_response(response, checks=SCHEMA_CHECKS)
        check_state_key(response, "volume_state", case)
    assert codes == [400, 429]


def test_worker_errors_conform(worker_app, host: Host, monkeypatch):
    schema = load_served(worker_app, WORKER_PREFIX)
    operation = schema[f"{WORKER_PREFIX}/nfs-mount"]["POST"]
    # 502: mount -a ran but a share is still missing.
    monkeypatch.setattr(host, "nfs_mount", lambda: {"nfs_state": "unmounted"})
    for headers, expected in [({"X-Luksctl-Token": CLUSTER_TOKEN}, 502), ({}, 403), ({"X-Luksctl-Token": "wrong"}, 403)]:
        case = operation.Case(headers=headers)
        response = case.call()
        assert response.status_code == expected, response.text
        case.validate_response(response, checks=SCHEMA_CHECKS)
        check_state_key(response, "nfs_state", case)
    # 500: the privileged call failed.
    def broken():
        raise errors.PrivilegedCallFailed("sudo failed")

    monkeypatch.setattr(host, "nfs_mount", broken)
    case = operation.Case(headers={"X-Luksctl-Token": CLUSTER_TOKEN})
    response = case.call()
    assert response.status_code == 500
    case.validate_response(response, checks=SCHEMA_CHECKS)
    check_state_key(response, "nfs_state", case)


@pytest.mark.parametrize("cause", ["ini missing", "mount table unreadable"])
def test_frontend_unavailable_conforms(frontend_app, frontend_config, host: Host, cause):
    if cause == "ini missing":
        Path(frontend_config.CRYPTDEV_INI).unlink()
    else:
        host.unreadable = True
    schema = load_served(frontend_app, FRONTEND_PREFIX)
    for path, method, kwargs in [
        ("/status", "GET", {}),
        ("/nodes", "GET", {}),
        ("/open", "POST", {"body": VALID_OPEN, "media_type": "application/json"}),
    ]:
        case = schema[f"{FRONTEND_PREFIX}{path}"][method].Case(**kwargs)
        response = case.call()
        case.validate_response(response, checks=SCHEMA_CHECKS)
        check_state_key(response, "volume_state", case)
        assert response.json()["volume_state"] == "unavailable"
        if path == "/status":
            assert response.status_code == 200 and response.json()["error"]
    assert host.opens == 0 and host.vault_calls == []


def test_worker_unavailable_conforms(worker_app, host: Host):
    host.unreadable = True
    schema = load_served(worker_app, WORKER_PREFIX)
    for path, method, headers in [("/status", "GET", {}), ("/nfs-mount", "POST", {"X-Luksctl-Token": CLUSTER_TOKEN})]:
        case = schema[f"{WORKER_PREFIX}{path}"][method].Case(headers=headers)
        response = case.call()
        case.validate_response(response, checks=SCHEMA_CHECKS)
        check_state_key(response, "nfs_state", case)
        assert response.json()["nfs_state"] == "unavailable"
    status = schema[f"{WORKER_PREFIX}/status"]["GET"].Case().call()
    assert status.status_code == 200 and status.json()["error"]


# --- Through the proxy: real HTTPS to nginx as proxy-config writes it, gunicorn on its socket. ---

PROXIED_EXAMPLES = 300  # per service: each is a real HTTPS request
PROXIED_MIN_CASES = 250
CONTRACT_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Proxied:
    schema: object
    state_key: str
    port: int
    cert: Path


SERVICES = {
    # service: (admin command, gunicorn app, state key, prefix, config.json but for the paths)
    "frontend": ("luksctl-api", "served_apps:frontend()", "volume_state", FRONTEND_PREFIX,
                 {"FAILED_OPEN_LIMIT": 0, "VAULT_URL_ALLOWLIST": [ALLOWED_VAULT], "PRIVILEGED_TIMEOUT": 5}),
    "worker": ("luksctl-api-wn", "served_apps:worker()", "nfs_state", WORKER_PREFIX, {"NFS_MOUNTPOINT_LIST": NFS_MOUNTPOINTS}),
}


@pytest.fixture(scope="module", params=sorted(SERVICES))
def proxied(request):
    """One service behind its proxy, in a directory nginx's workers (not root) can reach."""
    admin, app, state_key, prefix, settings_ = SERVICES[request.param]
    directory = Path(tempfile.mkdtemp(prefix=f"luksctl-proxied-{request.param}."))
    directory.chmod(0o755)
    (directory / "run").mkdir(mode=0o700)
    ini, token = directory / "luks-cryptdev.ini", directory / "cluster-token"
    ini.write_text(INI)
    token.write_text(CLUSTER_TOKEN + "\n")
    token.chmod(0o640)  # as install.sh leaves it
    config = directory / "config.json"
    volume = {"CRYPTDEV_INI": str(ini), "LOCK_FILE": str(directory / "run" / "open.lock")} if request.param == "frontend" else {}
    config.write_text(json.dumps({"ALLOWED_CLIENTS": [f"{ALLOWED}/32", f"{ALSO_ALLOWED}/32"], "CLUSTER_TOKEN_FILE": str(token),
                                  **volume, **settings_}))
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([installed(admin), "gen-cert", "--cert", str(cert), "--key", str(key), "--hostname", "localhost"],
                   check=True, capture_output=True)
    stack = Serving(directory, config, admin, env={**os.environ, "PYTHONPATH": str(CONTRACT_DIR)})
    socket_path, port = directory / "gunicorn.sock", free_port()
    try:
        stack.start_gunicorn(gunicorn_argv(app, socket_path, "--workers", "1", "-m", "000"), socket_path, directory / "gunicorn.log")
        stack.start_nginx("nginx", socket_path, port, cert=cert, key=key, user=PROXY_USER)
        document = requests.get(f"https://localhost:{port}{prefix}/openapi.json", verify=str(cert), timeout=30)
        document.raise_for_status()
        yield Proxied(schemathesis.openapi.from_dict(document.json(), config=CONFIG), state_key, port, cert)
    finally:
        stack.stop()
        shutil.rmtree(directory)


def test_fuzz_through_the_proxy(proxied: Proxied):
    """Issue 20: through nginx, no 5xx, and every answer, nginx's own included, JSON with the state key."""
    session = requests.Session()  # kept-alive connections, as the dashboard's
    base_url = f"https://localhost:{proxied.port}"

    def prepare(script: int, case) -> None:
        name_the_allowed_vault(script, case)
        send_the_cluster_token(script, case)

    started = time.monotonic()
    executed, failures, statuses = fuzz(proxied.schema, proxied.state_key, prepare, examples=PROXIED_EXAMPLES,
                                        call=lambda case: case.call(base_url=base_url, session=session, verify=str(proxied.cert), timeout=30))
    summary = report(f"{proxied.state_key} through the proxy", executed, failures, statuses, time.monotonic() - started)
    print(summary)
    assert not failures, summary
    assert executed >= PROXIED_MIN_CASES, summary
    assert min(runs_per_operation(proxied.schema, statuses).values()) >= 5, "some operations were barely exercised\n" + summary


@pytest.mark.parametrize("case", sorted(NGINX_ANSWERS))
def test_every_answer_nginx_makes_itself_carries_the_service_state_key(proxied: Proxied, case):
    """What schemathesis cannot send (support/raw_http.py, as test_proxy sends it to the front end)."""
    request, expected, source, tls = NGINX_ANSWERS[case]

    status, body = exchange(proxied.port, request, source, tls)

    assert status == expected
    assert body[proxied.state_key] == "unavailable" and body["error"]
