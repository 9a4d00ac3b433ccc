"""/metrics after opens against a real OpenBao (fake privileged bridge): each Vault request's latency
by step, and no label or value carries the wrapping token, the token inside, the passphrase or the
secret's path."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from luksctl import vault
from luksctl.errors import WrongPassphrase

from .conftest import KV2_ROOT, SECRET_KEY, open_body, post_open

STEPS = ["wrapping lookup", "unwrap", "mount lookup", "read secret", "revoke"]  # vault.py's own words, never a path


def counts(app) -> dict[str, float]:
    text = app.test_client().get("/metrics").text
    return {sample.labels["step"]: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "luksctl_api_vault_request_duration_seconds_count"}


def test_each_vault_request_of_an_open_is_timed_by_step(bao, frontend_app):
    steps = []
    settings = vault.VaultSettings(timeout=5, allow_http=True, on_request=lambda step, seconds: steps.append((step, seconds)))
    secret = f"timed-{uuid.uuid4().hex}"

    assert vault.fetch_passphrase(bao.url, vault.SecretRef(KV2_ROOT, bao.store_secret(secret), SECRET_KEY), bao.wrap_token().token, settings) == secret

    assert [step for step, _ in steps] == STEPS
    assert all(0 < seconds < 5 for _, seconds in steps)


def test_no_label_or_value_carries_a_token_the_passphrase_or_the_secret_path(bao, frontend_app, fake_bridge):
    before = counts(frontend_app)
    secret = f"planted passphrase {uuid.uuid4().hex}"
    path = bao.store_secret(secret)
    first, second = (bao.wrap_token(token_id=f"plantedtok{uuid.uuid4().hex}") for _ in range(2))  # the ids of the tokens inside
    fake_bridge.error = WrongPassphrase("no key available with this passphrase")
    assert post_open(frontend_app, open_body(bao.url, first.token, path)).status_code == 422
    fake_bridge.error = None
    assert post_open(frontend_app, open_body(bao.url, second.token, path)).status_code == 200

    text = frontend_app.test_client().get("/metrics").text

    assert {step: count - before.get(step, 0) for step, count in counts(frontend_app).items()} == {step: 2 for step in STEPS}
    for planted in (first.token, second.token, first.client_token, second.client_token, secret, path, path.split("/")[0], bao.url):
        assert planted not in text, planted
