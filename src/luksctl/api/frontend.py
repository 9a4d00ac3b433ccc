"""Front-end node API: /luksctl_api/v1.0/status and /open (PROTOCOL §3)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flask import Blueprint, Flask, current_app, request

from ..config import (
    MAX_BODY_BYTES,
    REQUIRED,
    FrontendConfig,
    InvalidSettings,
    Setting,
    Settings,
    VolumeConfig,
    api_config_path,
    at_most,
    load_api_config,
    load_volume_config,
    normalize_vault_url,
    text,
    vault_path,
)
from ..errors import BadRequest, BodyTooLarge, ConfigError, LuksctlError, UnsupportedMediaType, WrappingTokenInvalid
from ..locking import exclusive_lock
from ..status import VolumeState, volume_status
from .. import vault
from . import cluster, metrics
from .auditing import install_audit, note
from .coalesce import CoalescedCall, Outcome
from .errors import openapi_document, register_json_errors
from .guards import install_client_allowlist
from .privileged import PrivilegedBridge, SudoBridge
from .ratelimit import FailedOpenLimiter

log = logging.getLogger(__name__)

PREFIX = "/luksctl_api/v1.0"


class OpenRequest(Settings):
    """The body of open: checked like a config file, extra keys ignored (PROTOCOL §3)."""

    unknown_keys_ignored = True

    vault_url = Setting(REQUIRED, at_most(2048, normalize_vault_url))
    vault_token = Setting(REQUIRED, text(r"[A-Za-z0-9._-]{1,512}", "1 to 512 of A-Z a-z 0-9 . _ -"))
    secret_root = Setting(REQUIRED, vault_path(256))
    secret_path = Setting(REQUIRED, vault_path(1024))
    secret_key = Setting(REQUIRED, text(r"[A-Za-z0-9_.-]{1,256}", "1 to 256 of A-Z a-z 0-9 _ . -"))

    @property
    def ref(self) -> vault.SecretRef:
        return vault.SecretRef(self.secret_root, self.secret_path, self.secret_key)

    @property
    def location(self) -> str:
        """For the audit line."""
        return f"{self.secret_root}/{self.secret_path} (key {self.secret_key!r}) at {self.vault_url}"


def parse_open_request() -> OpenRequest:
    if not request.is_json:
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    # Read from the raw input: werkzeug's limit silently truncates a chunked body.
    raw = request.environ["wsgi.input"].read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        # Parsed here, not by get_json(): a deeply nested body must be a 400, not a RecursionError.
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not valid UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with vault_url, vault_token, secret_root, secret_path and secret_key")
    try:
        return OpenRequest(**body)
    except InvalidSettings as exc:  # names each key and what it allows, never the value: it may be the token
        raise BadRequest(f"invalid request body: {exc}") from None


class VolumeConfigCache:
    """The ini file, parsed again only when it changes: status polls cost one stat()."""

    def __init__(self, path: Path):
        self.path = path
        self._key: tuple | None = None
        self._volume: VolumeConfig | None = None

    def get(self) -> VolumeConfig:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise ConfigError(f"{self.path} cannot be read: {exc.strerror}; has the volume been encrypted yet?") from None
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        if key != self._key or self._volume is None:
            self._volume = load_volume_config(self.path)
            self._key = key
        return self._volume


class Frontend:
    def __init__(self, config: FrontendConfig, bridge: PrivilegedBridge):
        self.config = config
        self.bridge = bridge
        self.volumes = VolumeConfigCache(Path(config.CRYPTDEV_INI))
        verify = config.VAULT_CA_BUNDLE or config.VAULT_TLS_VERIFY
        self.vault_settings = vault.VaultSettings(
            verify, config.VAULT_TIMEOUT, tuple(config.WRAPPING_CREATION_PATHS), config.VAULT_DEADLINE, config.ALLOW_PLAIN_HTTP,
            on_request=metrics.observe_vault_request,
        )
        self.workers = cluster.WorkerClient.from_config(config) if config.is_cluster else None
        runtime = Path(config.LOCK_FILE).parent
        self.limiter = FailedOpenLimiter(runtime / "failed-opens.sqlite", config.FAILED_OPEN_LIMIT, config.FAILED_OPEN_WINDOW)
        if self.workers is not None:
            # Waiting for the fan-out in progress costs at most its own deadline.
            wait = self.workers.deadline + 10
            self.remounts = CoalescedCall(runtime, "fanout-nfs-mount", min_interval=config.FANOUT_MIN_INTERVAL, wait=wait)
            self.worker_polls = CoalescedCall(runtime, "fanout-status", min_interval=config.FANOUT_MIN_INTERVAL, wait=wait)
        _log_vault_url_policy(config)

    def state(self) -> VolumeState:
        volume = self.volumes.get()
        return volume_status(volume.cryptdev, volume.mountpoint).state

    def state_body(self) -> dict:
        """For error answers: the true state, or unavailable; never raises."""
        try:
            return {"volume_state": self.state().value}
        except (LuksctlError, OSError):
            return {"volume_state": VolumeState.UNAVAILABLE.value}

    def open(self, unlock: OpenRequest) -> dict:
        volume = self.volumes.get()
        note(volume=volume.cryptdev, vault_path=unlock.location)
        allowed = self.config.VAULT_URL_ALLOWLIST
        if allowed is None and not self.config.ALLOW_ANY_VAULT_URL:
            raise ConfigError(_no_vault_url_policy())
        if allowed is not None and unlock.vault_url not in allowed:
            raise BadRequest(f"vault_url {unlock.vault_url} is not in VAULT_URL_ALLOWLIST; nothing was contacted")
        unlocked_here = False
        if self.state() is not VolumeState.MOUNTED:
            # One open at a time across threads and gunicorn workers; whoever
            # waited finds the volume mounted and leaves its wrapping token unused.
            with exclusive_lock(Path(self.config.LOCK_FILE), timeout=self.config.PRIVILEGED_TIMEOUT + 30, what="open"):
                if self.state() is not VolumeState.MOUNTED:
                    self._unlock(unlock)
                    unlocked_here = True
        body = {"volume_state": self.state().value}
        if self.workers is not None and body["volume_state"] == VolumeState.MOUNTED.value:
            # After a new mount only a remount that starts now will do: earlier ones saw no export.
            outcome = self.remounts.run(lambda: cluster.remount_workers(self.workers, self.config.WN_IPS), fresh=unlocked_here)
            body["nodes"] = _noted_nodes(outcome)
        return body

    def _unlock(self, unlock: OpenRequest) -> None:
        try:
            with metrics.timed_stage("vault"):
                passphrase = vault.fetch_passphrase(unlock.vault_url, unlock.ref, unlock.vault_token, self.vault_settings)
        except WrappingTokenInvalid as exc:
            if exc.possible_interception:
                note(alert="wrapping token already unwrapped or expired: possible interception")
            raise
        with metrics.timed_stage("privileged"):
            self.bridge.open_volume(passphrase)
        metrics.LAST_OPEN.set_to_current_time()

    def nodes(self) -> dict:
        """The operator's view of every worker, fetched on demand (never on a status poll)."""
        if self.workers is None:
            note(nodes={})
            return {**self.state_body(), "nodes": {}}
        outcome = self.worker_polls.run(lambda: cluster.worker_states(self.workers, self.config.WN_IPS))
        return {**self.state_body(), "nodes": _noted_nodes(outcome)}


def _noted_nodes(outcome: Outcome) -> dict[str, str]:
    """Every fan-out answer is audited, and says whether it called the workers or reused a result."""
    note(nodes=outcome.value, fanout="shared" if outcome.shared else "new")
    return outcome.value


def _no_vault_url_policy() -> str:
    return (
        f"open is refused: {api_config_path()} sets no VAULT_URL_ALLOWLIST (the Vault URLs callers may name, "
        'e.g. ["https://vault.example:8200"]); set it, or set ALLOW_ANY_VAULT_URL: true to let callers name any URL'
    )


def _log_vault_url_policy(config: FrontendConfig) -> None:
    if config.VAULT_URL_ALLOWLIST:
        log.info("open contacts only the Vault URLs in VAULT_URL_ALLOWLIST: %s", ", ".join(config.VAULT_URL_ALLOWLIST))
    elif config.VAULT_URL_ALLOWLIST == []:
        log.error("VAULT_URL_ALLOWLIST in %s is empty: every open is refused until it names the Vault URLs", api_config_path())
    elif config.ALLOW_ANY_VAULT_URL:
        log.warning("ALLOW_ANY_VAULT_URL is true: callers may make this server contact any host and port as a Vault URL")
    else:
        log.error("%s", _no_vault_url_policy())


bp = Blueprint("frontend", __name__, url_prefix=PREFIX)


def _frontend() -> Frontend:
    return current_app.extensions["luksctl_frontend"]


@bp.get("/openapi.json")
def openapi():
    return openapi_document("frontend")


@bp.get("/status")
def status():
    try:
        return {"volume_state": _frontend().state().value}
    except (LuksctlError, OSError) as exc:
        message = exc.message if isinstance(exc, LuksctlError) else "the volume state cannot be read"
        return {"volume_state": VolumeState.UNAVAILABLE.value, "error": message}


@bp.post("/open")
def open_volume():
    frontend = _frontend()
    with frontend.limiter.counting_failures(request.remote_addr or "unknown"):
        return frontend.open(parse_open_request())


@bp.get("/nodes")
def nodes():
    return _frontend().nodes()


def create_frontend_app(config: FrontendConfig | None = None, bridge: PrivilegedBridge | None = None) -> Flask:
    if config is None:
        config = load_api_config(FrontendConfig)
    frontend = Frontend(config, bridge or SudoBridge(config.LUKSCTL_BINARY, config.PRIVILEGED_TIMEOUT))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["luksctl_frontend"] = frontend
    register_json_errors(app, frontend.state_body)
    install_audit(app, {"frontend.open_volume": "open", "frontend.status": "status", "frontend.nodes": "nodes", "metrics.metrics": "metrics"})
    install_client_allowlist(app, config.ALLOWED_CLIENTS)
    app.register_blueprint(bp)
    if config.METRICS:
        metrics.install_metrics(app, "luksctl_api_volume_state", lambda: frontend.state_body()["volume_state"], open_endpoint="frontend.open_volume")
    return app
