"""The published OpenAPI documents and the apps must not drift apart.

- every (method, path) the app routes is documented, and nothing else is;
- each app serves exactly the file in the repo;
- both files are valid OpenAPI 3.1 (checked with the meta-schema schemathesis ships);
- every HTTP status the error hierarchy can produce is documented where it can occur.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

import luksctl.api.errors as api_errors
from luksctl import errors
from luksctl.api.frontend import PREFIX as FRONTEND_PREFIX
from luksctl.api.worker import PREFIX as WORKER_PREFIX

OPENAPI_DIR = Path(api_errors.__file__).with_name("openapi")
IGNORED_METHODS = {"HEAD", "OPTIONS"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def load(name: str) -> dict:
    return json.loads((OPENAPI_DIR / f"{name}.json").read_text())


def routed(app: Flask) -> set[tuple[str, str]]:
    """(METHOD, /path/{param}) for every rule, Flask's static route and HEAD/OPTIONS left out."""
    pairs = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        pairs |= {(method, path) for method in rule.methods - IGNORED_METHODS}
    return pairs


def documented(document: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS and method.upper() not in IGNORED_METHODS
    }


@pytest.fixture(params=["frontend", "worker"])
def service(request, frontend_app, worker_app):
    app, prefix = {"frontend": (frontend_app, FRONTEND_PREFIX), "worker": (worker_app, WORKER_PREFIX)}[request.param]
    return request.param, app, prefix


def test_every_route_is_documented_and_nothing_else(service):
    name, app, prefix = service
    in_app = routed(app)
    in_doc = documented(load(name))
    assert in_app, "the app routes nothing?"
    assert all(path.startswith(prefix + "/") or path == "/metrics" for _, path in in_app | in_doc), f"a route outside {prefix} and /metrics"
    assert in_app - in_doc == set(), f"routed by the app but missing from {name}.json"
    assert in_doc - in_app == set(), f"in {name}.json but not routed by the app"


def test_served_document_is_the_file(service):
    name, app, prefix = service
    response = app.test_client().get(f"{prefix}/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == load(name)


@pytest.mark.parametrize("name", ["frontend", "worker"])
def test_document_is_valid_openapi_31(name):
    document = load(name)
    assert re.fullmatch(r"3\.1\.\d+", document["openapi"])
    errors_found = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in OPENAPI_31_VALIDATOR.iter_errors(document)]
    assert errors_found == []
    # Every schema is itself a valid JSON Schema 2020-12 (the 3.1 meta-schema does not check that).
    for schema_name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), schema_name
    # schemathesis loads it and finds every operation without error.
    loaded = schemathesis.openapi.from_dict(document)
    loaded.validate()
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) == len(documented(document))
    assert document["servers"], "a servers entry is required"


def test_every_error_status_is_documented_on_open():
    """open can surface any LuksctlError (Vault, the bridge, the lock, the limiter, the guard)."""

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    statuses = {str(cls.http_status) for cls in [errors.LuksctlError, *subclasses(errors.LuksctlError)]}
    open_responses = set(load("frontend")["paths"][f"{FRONTEND_PREFIX}/open"]["post"]["responses"])
    assert statuses - open_responses == set()
    # 413 (body too large) comes from werkzeug, not the hierarchy.
    assert "413" in open_responses


def test_retry_after_is_documented_on_429():
    document = load("frontend")
    response = document["components"]["responses"]["E429"]
    assert response["headers"]["Retry-After"]["required"] is True


def test_worker_documents_the_token_header():
    document = load("worker")
    scheme = document["components"]["securitySchemes"]["ClusterToken"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-Luksctl-Token")
    assert document["paths"][f"{WORKER_PREFIX}/nfs-mount"]["post"]["security"] == [{"ClusterToken": []}]


# --- The request schema of open and the app's validation agree at the edges. ---

VALID_OPEN = {
    "vault_url": "http://127.0.0.1:1",
    "vault_token": "hvs.CAES-wrap_ping",
    "secret_root": "secrets",
    "secret_path": "user@example.org/0b2e-4f4e/storage_encryption",
    "secret_key": "storage_encryption_key",
}
LIMITS = {"vault_token": 512, "secret_root": 256, "secret_path": 1024, "secret_key": 256}
FORBIDDEN = [
    *[(field, None) for field in VALID_OPEN],  # missing
    *[(field, "") for field in VALID_OPEN],
    *[(field, 7) for field in VALID_OPEN],
    *[(field, "a" * (limit + 1)) for field, limit in LIMITS.items()],
    ("vault_url", "http://" + "a" * 2050),
    ("vault_token", "tok en"),
    ("vault_token", "tok\n"),
    ("secret_key", "key/sub"),
    ("secret_key", "key\n"),
    *[
        (field, value)
        for field in ("secret_root", "secret_path")
        for value in ("/lead", "trail/", "a//b", ".", "..", "a/../b", "a/./b", "../a", "a/..", "a b", "a?b", "a%2fb", "a#b", "ok\n", "a/b\n")
    ],
]


def _open_request_validator():
    schema = load("frontend")["components"]["schemas"]["OpenRequest"]
    return jsonschema_rs.Draft202012Validator(schema)


@pytest.mark.parametrize(("field", "value"), FORBIDDEN, ids=lambda v: repr(v)[:40])
def test_open_refuses_what_the_document_forbids(frontend_app, host, field, value):
    body = {key: val for key, val in VALID_OPEN.items() if key != field}
    if value is not None:
        body[field] = value
    assert not _open_request_validator().is_valid(body), "the document accepts it: fix the test or the document"
    response = frontend_app.test_client().post(f"{FRONTEND_PREFIX}/open", json=body)
    assert response.status_code == 400, f"the app accepted {field}={value!r}: {response.get_data(as_text=True)}"
    assert response.get_json()["volume_state"] == "unmounted"
    assert host.opens == 0 and host.vault_calls == []


ACCEPTED = [
    {},
    {"vault_url": "http://127.0.0.1:1/"},
    {"vault_url": "HTTP://127.0.0.1:1"},
    {"extra": {"ignored": [1, 2]}},
    {"secret_root": "a" * 256, "secret_path": "/".join(["b" * 9] * 100) + "/c" * 12, "secret_key": "k" * 256},
    {"secret_path": "a.b/..c/.d/e..", "secret_key": ".-_"},
    {"vault_token": "t" * 512},
]


@pytest.mark.parametrize("patch", ACCEPTED, ids=lambda v: repr(v)[:40])
def test_open_accepts_what_the_document_allows(frontend_app, host, patch):
    body = {**VALID_OPEN, **patch}
    assert _open_request_validator().is_valid(body), "the document refuses it: fix the test or the document"
    response = frontend_app.test_client().post(f"{FRONTEND_PREFIX}/open", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"volume_state": "mounted"}
    assert host.opens == 1
