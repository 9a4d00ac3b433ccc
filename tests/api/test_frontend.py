"""The front-end API through Flask's test client, with a fake bridge, scripted state and a faked Vault step.

The dashboard does json.loads(r.text)["volume_state"] on every answer, so every test
goes through `answer()`, which checks that contract before anything else.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from frontend_fakes import INI, OPEN, PASSPHRASE, STATUS, TOKEN, answer, make_client, payload

from luksctl.api import create_frontend_app
from luksctl.config import FrontendConfig
from luksctl.errors import LockTimeout, SecretNotFound, VaultUnreachable, WrappingTokenInvalid, WrongPassphrase

# --- status ------------------------------------------------------------------


def test_status_unmounted(client, kernel):
    assert answer(client.get(STATUS), 200) == {"volume_state": "unmounted"}
    assert kernel.reads == [("xkqzbmwe", "/export")]


def test_status_mounted(client, kernel):
    kernel.mounted = True

    assert answer(client.get(STATUS), 200) == {"volume_state": "mounted"}


def test_status_unavailable_without_the_ini(client, ini):
    ini.unlink()

    assert answer(client.get(STATUS), 200)["volume_state"] == "unavailable"


def test_status_unavailable_with_an_invalid_ini(client, ini):
    ini.write_text("[luks]\nuuid = ; rm -rf /\n")

    assert answer(client.get(STATUS), 200)["volume_state"] == "unavailable"


def test_status_follows_a_rewritten_ini(client, ini, kernel):
    answer(client.get(STATUS), 200)
    ini.write_text(INI.replace("/export", "/data/encrypted"))

    answer(client.get(STATUS), 200)

    assert kernel.reads[-1] == ("xkqzbmwe", "/data/encrypted")


# --- open: validation ----------------------------------------------------------


@pytest.mark.parametrize("missing", ["vault_url", "vault_token", "secret_root", "secret_path", "secret_key"])
def test_open_without_a_field_is_400(client, fake_vault, bridge, missing):
    body = answer(client.post(OPEN, json=payload(**{missing: None})), 400)

    assert missing in body["error"]
    assert fake_vault.calls == [] and bridge.passphrases == []


@pytest.mark.parametrize("field", ["secret_root", "secret_path"])
@pytest.mark.parametrize(
    "value",
    ["..", "a/../b", "a/./b", "/abs", "trailing/", "a//b", "a?b", "a#b", "a%2e%2e", "a\0b", "a b", "a\tb", "a\nb", "", "sys/../../v1/sys/raw"],
)
def test_open_rejects_path_tricks_in_secret_location(client, fake_vault, bridge, field, value):
    body = answer(client.post(OPEN, json=payload(**{field: value})), 400)

    assert field in body["error"]
    assert fake_vault.calls == [] and bridge.passphrases == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://vault.example:8200",
        "file:///etc/shadow",
        "https://user:pw@vault.example:8200",
        "https://:pw@vault.example",
        "https://vault.example:8200?x=1",
        "https://vault.example:8200/#frag",
        "https://vault.example:8200/v1/sys",
        "https://vault.example:99999",
        "https://vault example",
        "vault.example:8200",
        "https://",
        "https://[::1",
    ],
)
def test_open_rejects_bad_vault_urls(client, fake_vault, url):
    body = answer(client.post(OPEN, json=payload(vault_url=url)), 400)

    assert "vault_url" in body["error"]
    assert fake_vault.calls == []


@pytest.mark.parametrize("token", ["has space", "semi;colon", "x" * 513, "tok\nen"])
def test_open_rejects_a_bad_token_without_echoing_it(client, fake_vault, token):
    response = client.post(OPEN, json=payload(vault_token=token))

    body = answer(response, 400)
    assert "vault_token" in body["error"]
    assert token not in response.text
    assert fake_vault.calls == []


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("vault_token", "has space", "vault_token': must be 1 to 512 of A-Z a-z 0-9 . _ -"),
        ("secret_key", "", "secret_key': must be 1 to 256 of A-Z a-z 0-9 _ . -"),
        ("secret_root", 7, "secret_root': must be 1 to 256 characters: segments of A-Z a-z 0-9 _ @ : + = . - separated by single '/'"),
        ("secret_path", "a/../b", "secret_path': must be 1 to 1024 characters: segments of A-Z a-z 0-9"),
        ("vault_url", "https://" + "v" * 2048, "vault_url': must be at most 2048 characters"),
        ("vault_url", "vault.example:8200", "vault_url': must look like https://vault.example:8200"),
        ("vault_url", None, "vault_url': is required"),
    ],
)
def test_open_refusal_says_what_the_field_allows(client, fake_vault, field, value, allowed):
    """The same words as a bad config.json key: config.py checks both."""
    body = answer(client.post(OPEN, json=payload(**{field: value})), 400)

    assert allowed in body["error"]
    assert fake_vault.calls == []


def test_open_ignores_extra_keys_even_one_named_self(client, fake_vault, bridge):
    answer(client.post(OPEN, json=payload(self="x", values=[1], extra={"a": 1})), 200)

    assert bridge.passphrases == [PASSPHRASE]


def test_open_with_a_non_json_body_is_400(client, fake_vault):
    answer(client.post(OPEN, data="vault_url=https://vault", content_type="application/json"), 400)
    assert fake_vault.calls == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_open_with_a_wrong_content_type_is_415(client, fake_vault, content_type):
    answer(client.post(OPEN, data=json.dumps(payload()), content_type=content_type), 415)
    assert fake_vault.calls == []


def test_open_with_a_deeply_nested_body_is_400(client, fake_vault):
    answer(client.post(OPEN, data="[" * 5000 + "]" * 5000, content_type="application/json"), 400)
    assert fake_vault.calls == []


def test_open_with_a_body_that_is_not_utf8_is_400(client, fake_vault):
    answer(client.post(OPEN, data=b'{"vault_url": "\xff\xfe"}', content_type="application/json"), 400)
    assert fake_vault.calls == []


@pytest.mark.parametrize("document", [[payload()], "a string", None, 42])
def test_open_with_a_json_body_that_is_not_an_object_is_400(client, fake_vault, document):
    answer(client.post(OPEN, data=json.dumps(document), content_type="application/json"), 400)
    assert fake_vault.calls == []


def test_a_chunked_body_over_16_kib_is_413_not_truncated(client, fake_vault):
    """Without Content-Length nothing says how much is coming; the limit must still hold."""
    body = json.dumps(payload()).encode() + b" " * (16 * 1024)

    response = client.post(OPEN, input_stream=io.BytesIO(body), content_type="application/json", headers={"Transfer-Encoding": "chunked"})

    answer(response, 413)
    assert fake_vault.calls == []


def test_open_with_a_body_over_16_kib_is_413(client, fake_vault):
    response = client.post(OPEN, json=payload(padding="x" * (16 * 1024)))

    answer(response, 413)
    assert fake_vault.calls == []


def test_open_ignores_extra_fields(client, bridge):
    assert answer(client.post(OPEN, json=payload(dashboard_version="2.1")), 200) == {"volume_state": "mounted"}


# --- open: the flow ------------------------------------------------------------


def test_open_when_already_mounted_does_not_contact_vault(client, kernel, fake_vault, bridge):
    kernel.mounted = True

    assert answer(client.post(OPEN, json=payload()), 200) == {"volume_state": "mounted"}
    assert fake_vault.calls == [] and bridge.passphrases == []


def test_open_fetches_the_passphrase_and_hands_it_to_the_bridge(client, fake_vault, bridge):
    body = answer(client.post(OPEN, json=payload(vault_url="https://vault.example:8200/")), 200)

    assert body == {"volume_state": "mounted"}
    assert bridge.passphrases == [PASSPHRASE]
    ((url, ref, token, settings),) = fake_vault.calls
    assert token == TOKEN
    assert (url, ref.mount, ref.path, ref.key) == (
        "https://vault.example:8200",
        "secrets",
        "user-sub@idp/3f1c0f7e-deployment/storage_encryption",
        "storage_encryption_key",
    )
    assert settings.verify is True


@pytest.mark.parametrize(
    "url, normalized",
    [("https://Vault.Example:8200/", "https://vault.example:8200"), ("https://vault.example", "https://vault.example:443")],
)
def test_vault_url_is_normalized(client, fake_vault, url, normalized):
    answer(client.post(OPEN, json=payload(vault_url=url)), 200)

    assert fake_vault.calls[0][0] == normalized


def test_vault_url_outside_the_allowlist_is_400_and_not_contacted(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, VAULT_URL_ALLOWLIST=["https://vault.example:8200"])

    body = answer(client.post(OPEN, json=payload(vault_url="https://169.254.169.254")), 400)

    assert "VAULT_URL_ALLOWLIST" in body["error"]
    assert fake_vault.calls == [] and bridge.passphrases == []


def test_vault_url_in_the_allowlist_matches_after_normalization(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, VAULT_URL_ALLOWLIST=["https://vault.example:443"])

    answer(client.post(OPEN, json=payload(vault_url="https://VAULT.example/")), 200)

    assert bridge.passphrases == [PASSPHRASE]


def test_repeated_failed_opens_are_limited_with_429(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, FAILED_OPEN_LIMIT=2, FAILED_OPEN_WINDOW=60)
    fake_vault.error = WrappingTokenInvalid("the wrapping token is invalid, expired or already used")

    statuses = [client.post(OPEN, json=payload()).status_code for _ in range(2)]
    response = client.post(OPEN, json=payload())

    assert statuses == [403, 403]
    answer(response, 429)
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert len(fake_vault.calls) == 2


def test_vault_being_down_does_not_count_as_a_failed_open(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, FAILED_OPEN_LIMIT=1)
    fake_vault.error = VaultUnreachable("Vault at https://vault.example:8200 cannot be reached")

    assert [client.post(OPEN, json=payload()).status_code for _ in range(3)] == [502, 502, 502]


def test_clients_outside_allowed_clients_get_json_403(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, ALLOWED_CLIENTS=["10.0.0.0/24"])

    answer(client.get(STATUS, environ_base={"REMOTE_ADDR": "192.0.2.9"}), 403)
    answer(client.post(OPEN, json=payload(), environ_base={"REMOTE_ADDR": "192.0.2.9"}), 403)
    assert answer(client.get(STATUS, environ_base={"REMOTE_ADDR": "10.0.0.7"}), 200) == {"volume_state": "unmounted"}
    assert fake_vault.calls == []


@pytest.mark.parametrize(("peer", "forwarded_for", "expected"), [
    ("", "10.0.0.7", 200),  # a Unix socket (the proxy's): its X-Forwarded-For is the client
    ("", "192.0.2.9", 403),
    ("", None, 403),  # over the socket with no header: no client address, no entry
    ("10.0.0.7", "192.0.2.9", 200),  # over TCP the peer is the client, whatever it claims
    ("192.0.2.9", "10.0.0.7", 403),
])
def test_the_client_is_the_proxys_forwarded_for_only_over_a_unix_socket(tmp_path, ini, bridge, peer, forwarded_for, expected):
    client = make_client(tmp_path, ini, bridge, ALLOWED_CLIENTS=["10.0.0.0/24"])
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}

    answer(client.get(STATUS, headers=headers, environ_base={"REMOTE_ADDR": peer}), expected)


def test_open_uses_the_configured_ca_bundle_for_vault(tmp_path, ini, bridge, fake_vault):
    config = FrontendConfig(CRYPTDEV_INI=str(ini), LOCK_FILE=str(tmp_path / "l"), VAULT_CA_BUNDLE="/etc/luks/vault-ca.pem", VAULT_TIMEOUT=3, ALLOW_ANY_VAULT_URL=True)
    client = create_frontend_app(config, bridge=bridge).test_client()

    answer(client.post(OPEN, json=payload()), 200)

    ((_, _, _, settings),) = fake_vault.calls
    assert (settings.verify, settings.timeout) == ("/etc/luks/vault-ca.pem", 3)


@pytest.mark.parametrize(
    "error, status",
    [
        (WrappingTokenInvalid("the wrapping token is invalid, expired or already used"), 403),
        (SecretNotFound("no secret at secrets/x"), 404),
        (VaultUnreachable("Vault at https://vault.example:8200 cannot be reached"), 502),
    ],
)
def test_vault_errors_map_to_statuses(client, fake_vault, bridge, error, status):
    fake_vault.error = error

    body = answer(client.post(OPEN, json=payload()), status)

    assert body == {"volume_state": "unmounted", "error": error.message}
    assert bridge.passphrases == []


@pytest.mark.parametrize(
    "error, status",
    [
        (WrongPassphrase("the passphrase does not open /dev/disk/by-uuid/0b2e; the volume stays closed"), 422),
        (LockTimeout("another luksctl open or close is still running"), 503),
    ],
)
def test_bridge_errors_map_to_statuses(client, bridge, error, status):
    bridge.error = error

    body = answer(client.post(OPEN, json=payload()), status)

    assert body == {"volume_state": "unmounted", "error": error.message}


def test_unexpected_bridge_crash_is_a_json_500_without_details(client, bridge):
    bridge.error = RuntimeError('Traceback (most recent call last):\n  File "/opt/luksctl/x.py" secret-detail')

    response = client.post(OPEN, json=payload())

    answer(response, 500)
    assert "secret-detail" not in response.text and "x.py" not in response.text


def test_error_answers_carry_the_true_state(client, kernel, bridge):
    bridge.error = LockTimeout("busy")
    kernel.mounted = False

    def open_then_mount(passphrase):
        kernel.mounted = True  # another worker finished meanwhile
        raise LockTimeout("busy")

    bridge.open_volume = open_then_mount

    assert answer(client.post(OPEN, json=payload()), 503)["volume_state"] == "mounted"


# --- routing -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/luksctl_api/v1.0/nope", "/luksctl_api/v2.0/status", "/luksctl_api_wn/v1.0/status"])
def test_unknown_routes_are_json_404(client, path):
    answer(client.get(path), 404)


def test_wrong_method_is_json_405_with_allow(client):
    response = client.get(OPEN)

    answer(response, 405)
    assert "POST" in response.headers["Allow"]


def test_post_to_status_is_json_405(client):
    answer(client.post(STATUS, json={}), 405)


# --- concurrency -------------------------------------------------------------------


def test_concurrent_opens_reach_vault_and_the_bridge_once(app, bridge, fake_vault):
    bridge.delay = 0.5
    start = threading.Barrier(2)
    responses, sent, answered = [], [], []

    def post_open():
        client = app.test_client()
        start.wait()
        sent.append(time.monotonic())
        responses.append(client.post(OPEN, json=payload()))
        answered.append(time.monotonic())

    threads = [threading.Thread(target=post_open) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert max(sent) < min(answered), "the requests ran one after the other: nothing here was concurrent"
    assert [answer(response, 200) for response in responses] == [{"volume_state": "mounted"}] * 2
    assert bridge.passphrases == [PASSPHRASE]
    assert len(fake_vault.calls) == 1


# --- Vault URL policy (issue 10, item 3) ------------------------------------------------------


def test_open_is_refused_when_no_vault_url_policy_is_set(tmp_path, ini, bridge, fake_vault, monkeypatch):
    """No VAULT_URL_ALLOWLIST and no written opt-out: nothing is contacted, and the message
    tells the operator which file and which keys."""
    config_file = tmp_path / "config.json"
    monkeypatch.setenv("LUKSCTL_API_CONFIG", str(config_file))
    client = create_frontend_app(FrontendConfig(CRYPTDEV_INI=str(ini), LOCK_FILE=str(tmp_path / "open.lock")), bridge=bridge).test_client()

    body = answer(client.post(OPEN, json=payload()), 500)

    assert body["error"].startswith(f"open is refused: {config_file} sets no VAULT_URL_ALLOWLIST")
    assert "ALLOW_ANY_VAULT_URL: true" in body["error"]
    assert fake_vault.calls == [] and bridge.passphrases == []


@pytest.mark.parametrize(
    "settings, level, message",
    [
        ({}, logging.ERROR, "open is refused: "),
        ({"ALLOW_ANY_VAULT_URL": True}, logging.WARNING, "ALLOW_ANY_VAULT_URL is true: callers may make this server contact any host"),
        ({"VAULT_URL_ALLOWLIST": ["https://vault.example:8200"]}, logging.INFO, "only the Vault URLs in VAULT_URL_ALLOWLIST: https://vault.example:8200"),
    ],
    ids=["unset", "opt-out", "allowlist"],
)
def test_start_up_logs_the_vault_url_policy(tmp_path, ini, bridge, caplog, settings, level, message):
    caplog.set_level(logging.INFO, logger="luksctl")

    create_frontend_app(FrontendConfig(CRYPTDEV_INI=str(ini), LOCK_FILE=str(tmp_path / "open.lock"), **settings), bridge=bridge)

    [record] = [r for r in caplog.records if "VAULT_URL" in r.getMessage()]
    assert (record.levelno, message in record.getMessage()) == (level, True), record.getMessage()


# --- Failed-open limit under concurrency (issue 10, item 8) -----------------------------------


def test_concurrent_failing_opens_from_one_address_pass_only_up_to_the_limit(tmp_path, ini, bridge, fake_vault):
    """16 requests at once, each failing slowly: the check and the record are one step, so
    exactly FAILED_OPEN_LIMIT of them reach Vault (a real sqlite file, the real app)."""
    app = create_frontend_app(
        FrontendConfig(CRYPTDEV_INI=str(ini), LOCK_FILE=str(tmp_path / "open.lock"), ALLOW_ANY_VAULT_URL=True, FAILED_OPEN_LIMIT=5),
        bridge=bridge,
    )
    fake_vault.error = WrappingTokenInvalid("the wrapping token is invalid, expired or already used")
    fake_vault.delay = 0.1
    start = threading.Barrier(16)

    def failing_open(_):
        start.wait()
        return app.test_client().post(OPEN, json=payload()).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = sorted(pool.map(failing_open, range(16)))

    assert statuses == [403] * 5 + [429] * 11
    assert len(fake_vault.calls) == 5


def test_successful_opens_do_not_count_against_the_limit(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, FAILED_OPEN_LIMIT=1)

    assert [client.post(OPEN, json=payload()).status_code for _ in range(3)] == [200, 200, 200]
