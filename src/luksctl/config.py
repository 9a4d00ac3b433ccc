"""Config files -> validated, frozen models.

Every error names the file and the key, and says what is allowed, so an
operator can fix it without reading code.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import re
import stat
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

VOLUME_INI = Path("/etc/luks/luks-cryptdev.ini")
API_CONFIG = Path("/etc/luks/config.json")
API_CONFIG_ENV = "LUKSCTL_API_CONFIG"
LUKSCTL_BINARY = "/usr/local/sbin/luksctl"
CLUSTER_TOKEN = "/etc/luks/cluster-token"

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


def _absolute_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value or any(part == ".." for part in value.split("/")):
        raise ValueError("must be an absolute path without '..'")
    return os.path.normpath(value)


def _host(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        if _HOSTNAME.fullmatch(value) and not value.replace(".", "").isdigit():
            return value
    raise ValueError("must be an IP address or a host name")


def normalize_vault_url(value: str) -> str:
    """scheme://host:port with the default port made explicit, for exact comparison."""
    parsed = urllib.parse.urlsplit(value)
    try:
        port = parsed.port or {"https": 443, "http": 80}.get(parsed.scheme)
    except ValueError:
        port = None
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or port is None
        or parsed.username is not None
        or parsed.query
        or parsed.fragment
        or parsed.path not in ("", "/")
        or any(c.isspace() or ord(c) < 32 for c in value)
    ):
        raise ValueError("must look like https://vault.example:8200, without credentials, path, query or fragment")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host.lower()}:{port}"


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
VaultUrl = Annotated[str, AfterValidator(normalize_vault_url)]
Host = Annotated[str, AfterValidator(_host)]
ServiceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")]


class VolumeConfig(BaseModel):
    """The `[luks]` section of luks-cryptdev.ini, as fast-luks writes it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    uuid: Annotated[str, Field(pattern=r"^[0-9A-Fa-f-]{8,64}$")]
    cryptdev: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,126}$")]
    mountpoint: AbsolutePath
    filesystem: Annotated[str, Field(pattern=r"^[a-z0-9]{1,16}$")] = "ext4"
    device: str | None = None
    mapper: str | None = None
    cipher_algorithm: str | None = None
    hash_algorithm: str | None = None
    keysize: str | None = None
    header_path: str | None = None

    @model_validator(mode="after")
    def _mapper_matches_cryptdev(self) -> "VolumeConfig":
        if self.mapper and self.mapper != self.mapper_path:
            raise ValueError(f"mapper is {self.mapper!r} but cryptdev implies {self.mapper_path!r}")
        return self

    @property
    def device_path(self) -> str:
        return f"/dev/disk/by-uuid/{self.uuid}"

    @property
    def mapper_path(self) -> str:
        return f"/dev/mapper/{self.cryptdev}"


class _JsonConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    LUKSCTL_BINARY: AbsolutePath = LUKSCTL_BINARY
    # Defence in depth behind the firewall: None lets every address in.
    ALLOWED_CLIENTS: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None
    # gunicorn refuses to start without --certfile unless this is true.
    ALLOW_PLAIN_HTTP: bool = False
    # How long the privileged call may take: cryptsetup's PBKDF alone is ~2 s by design.
    PRIVILEGED_TIMEOUT: Annotated[float, Field(gt=0, le=600)] = 180


class FrontendConfig(_JsonConfig):
    """config.json of the front-end node (PROTOCOL §4), plus optional keys of ours."""

    INFRASTRUCTURE_CONFIGURATION: Literal["single_vm", "cluster"] = "single_vm"
    VIRTUALIZATION_TYPE: Literal["docker", "none"] | None = None
    WN_IPS: list[Host] = []
    NFS_SERVICE: ServiceName | None = None
    CRYPTDEV_INI: AbsolutePath = str(VOLUME_INI)
    VAULT_TLS_VERIFY: bool = True
    VAULT_CA_BUNDLE: AbsolutePath | None = None
    VAULT_TIMEOUT: Annotated[float, Field(gt=0, le=120)] = 10
    # One hard limit for the whole Vault exchange of an open (lookup, unwrap, read, revoke).
    VAULT_DEADLINE: Annotated[float, Field(gt=0, le=600)] = 30
    # The Vault servers a caller may name. Unset refuses every open, unless the operator
    # opts out in writing with ALLOW_ANY_VAULT_URL: true (any URL: a request forgery risk).
    VAULT_URL_ALLOWLIST: list[VaultUrl] | None = None
    ALLOW_ANY_VAULT_URL: bool = False
    # Where a wrapping token must have been created; [] skips the check.
    WRAPPING_CREATION_PATHS: list[str] = ["auth/token/create"]
    # Failed opens per client address before 429 (0 disables), and the window in seconds.
    FAILED_OPEN_LIMIT: Annotated[int, Field(ge=0)] = 5
    FAILED_OPEN_WINDOW: Annotated[float, Field(gt=0)] = 300
    LOCK_FILE: AbsolutePath = "/run/luksctl-api/open.lock"
    # Cluster: how the front end reaches the worker APIs (PROTOCOL §5).
    WN_SCHEME: Literal["https", "http"] = "https"
    WN_PORT: Annotated[int, Field(ge=1, le=65535)] = 5000
    WN_TLS_VERIFY: bool = True
    WN_CA_BUNDLE: AbsolutePath | None = None
    WN_CONNECT_TIMEOUT: Annotated[float, Field(gt=0, le=60)] = 5
    WN_READ_TIMEOUT: Annotated[float, Field(gt=0, le=600)] = 60
    CLUSTER_TOKEN_FILE: AbsolutePath = CLUSTER_TOKEN
    # Cluster: at most one worker fan-out per this many seconds; requests in between share its result.
    FANOUT_MIN_INTERVAL: Annotated[float, Field(ge=0)] = 10

    @model_validator(mode="after")
    def _cluster_needs_workers(self) -> "FrontendConfig":
        if self.INFRASTRUCTURE_CONFIGURATION == "cluster" and not self.WN_IPS:
            raise ValueError("INFRASTRUCTURE_CONFIGURATION is 'cluster' but WN_IPS is empty")
        return self

    @property
    def restarts_docker(self) -> bool:
        return self.VIRTUALIZATION_TYPE == "docker"

    @property
    def is_cluster(self) -> bool:
        return self.INFRASTRUCTURE_CONFIGURATION == "cluster"


class WorkerConfig(_JsonConfig):
    """config.json of a worker node (PROTOCOL §5)."""

    NFS_MOUNTPOINT_LIST: Annotated[list[AbsolutePath], Field(min_length=1)]
    CLUSTER_TOKEN_FILE: AbsolutePath = CLUSTER_TOKEN
    # Only for front ends too old to send the cluster token.
    ALLOW_UNAUTHENTICATED_NFS_MOUNT: bool = False


Model = TypeVar("Model", bound=BaseModel)


def describe_validation_error(path: Path, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "is not a known key (see README, Configuration)"
        problems.append(f"key {key!r}: {message}")
    return f"{path}: " + "; ".join(problems)


def ensure_root_owned(path: Path) -> None:
    """Refuse a file that a non-root user could have written: root acts on what it says."""
    for checked in (path, path.parent):
        info = checked.stat()
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"{checked} must be owned by root and not writable by group or others "
                f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})"
            )


def _read_text(path: Path, *, root_owned: bool) -> str:
    try:
        if root_owned:
            ensure_root_owned(path)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc.__class__.__name__}: {getattr(exc, 'strerror', '') or exc}") from None


def load_volume_config(path: Path = VOLUME_INI, *, root_owned: bool = False) -> VolumeConfig:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    try:
        parser.read_string(_read_text(path, root_owned=root_owned), source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"{path} is not a valid ini file: {exc.message}") from None
    if not parser.has_section("luks"):
        raise ConfigError(f"{path} has no [luks] section")
    try:
        return VolumeConfig.model_validate(dict(parser.items("luks")))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None


def load_json_config(model: type[Model], path: Path, *, root_owned: bool = False, missing_ok: bool = False) -> Model:
    if missing_ok and not path.exists():
        data = {}
    else:
        try:
            data = json.loads(_read_text(path, root_owned=root_owned))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None


def api_config_path() -> Path:
    return Path(os.environ.get(API_CONFIG_ENV) or API_CONFIG)


def load_api_config(model: type[Model]) -> Model:
    """The service's config.json; only the default path may be absent (then: single_vm defaults)."""
    return load_json_config(model, api_config_path(), missing_ok=API_CONFIG_ENV not in os.environ)


def plain_http_allowed() -> bool:
    """Read before the app (and its model) is loaded, by gunicorn's on_starting hook."""
    try:
        return json.loads(api_config_path().read_text()).get("ALLOW_PLAIN_HTTP") is True
    except (OSError, ValueError, AttributeError):
        return False
