"""Config files -> validated, frozen settings objects.

Every error names the file and the key, and says what is allowed, so an
operator can fix it without reading code.

Standard library only: `luksctl` runs as root and imports this module on every
open, so each import here is code that runs as root and start-up time (issue 11).
The services use the same classes, for config.json and for the body of open.
A key is one `Setting` line: its default and the check that validates (and
normalises) a value.
"""

from __future__ import annotations

import configparser
import json
import math
import os
import re
import stat
import urllib.parse
from pathlib import Path

from .errors import ConfigError

VOLUME_INI = Path("/etc/luks/luks-cryptdev.ini")
API_CONFIG = Path("/etc/luks/config.json")
API_CONFIG_ENV = "LUKSCTL_API_CONFIG"
LUKSCTL_BINARY = "/usr/local/sbin/luksctl"
CLUSTER_TOKEN = "/etc/luks/cluster-token"
# The largest request body the front end reads (open's JSON): the app refuses more, and the
# proxy (api/proxy.py) sizes its buffers and its own 413 by it.
MAX_BODY_BYTES = 16 * 1024

_HOSTNAME = r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*"
_VAULT_PATH = r"[A-Za-z0-9_@:+=.-]+(/[A-Za-z0-9_@:+=.-]+)*"

# --- checks: take a value, return it (normalised) or raise ValueError("must ...") -----------


class InvalidItem(ValueError):
    """A list element was refused; `index` lets the message name it ('WN_IPS.1')."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def string(value):
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def text(pattern: str, allowed: str):
    """A string matching `pattern` (whole string); `allowed` says the same in words."""

    def check(value):
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise ValueError(f"must be {allowed}")
        return value

    return check


def one_of(*choices: str):
    def check(value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError("must be one of " + ", ".join(repr(choice) for choice in choices))
        return value

    return check


def boolean(value):
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _bounds_text(gt, ge, le) -> str:
    bounds = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "", f"<= {le}" if le is not None else ""]
    return " and ".join(bound for bound in bounds if bound)


def number(*, gt: float | None = None, ge: float | None = None, le: float | None = None):
    def check(value):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (gt is not None and not value > gt)
            or (ge is not None and not value >= ge)
            or (le is not None and not value <= le)
        ):
            raise ValueError(f"must be a number {_bounds_text(gt, ge, le)}".rstrip())
        return float(value)

    return check


def integer(*, ge: int | None = None, le: int | None = None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or (ge is not None and value < ge) or (le is not None and value > le):
            raise ValueError(f"must be a whole number {_bounds_text(None, ge, le)}".rstrip())
        return value

    return check


def optional(check):
    """None (JSON null, or the key left out) or what `check` allows."""
    return lambda value: None if value is None else check(value)


def list_of(check, *, min_length: int = 0):
    def check_list(value):
        if not isinstance(value, list):
            raise ValueError("must be a list")
        if len(value) < min_length:
            raise ValueError(f"must hold at least {min_length} entr{'y' if min_length == 1 else 'ies'}")
        checked = []
        for index, item in enumerate(value):
            try:
                checked.append(check(item))
            except ValueError as exc:
                raise InvalidItem(index, str(exc)) from None
        return checked

    return check_list


def absolute_path(value):
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or any(part == ".." for part in value.split("/")):
        raise ValueError("must be an absolute path without '..'")
    return os.path.normpath(value)


def host(value):
    import ipaddress  # here, not at the top: only cluster settings need it, and luksctl status must start fast

    string(value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        if re.fullmatch(_HOSTNAME, value) and not value.replace(".", "").isdigit():
            return value
    raise ValueError("must be an IP address or a host name")


def network(value):
    import ipaddress  # see host()

    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):  # a loaded config, copied by replace()
        return value
    try:
        return ipaddress.ip_network(string(value))
    except ValueError:
        raise ValueError("must be an IP network such as 192.0.2.0/24 or 192.0.2.10 (no host bits set)") from None


def at_most(length: int, check):
    """A string of at most `length` characters that `check` allows; the length is checked first."""

    def check_length(value):
        if isinstance(value, str) and len(value) > length:
            raise ValueError(f"must be at most {length} characters")
        return check(value)

    return check_length


def vault_path(length: int):
    """A Vault path we can put in a URL as it is: no '..', '?', '#', '%', NUL or spaces."""

    def check(value):
        if (
            not isinstance(value, str)
            or len(value) > length
            or not re.fullmatch(_VAULT_PATH, value)
            or any(part in (".", "..") for part in value.split("/"))
        ):
            raise ValueError(
                f"must be 1 to {length} characters: segments of A-Z a-z 0-9 _ @ : + = . - separated by single '/', "
                "with no leading or trailing '/' and no '.' or '..' segment"
            )
        return value

    return check


def normalize_vault_url(value: str) -> str:
    """scheme://host:port with the default port made explicit, for exact comparison."""
    parsed = urllib.parse.urlsplit(string(value))
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
    host_part = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host_part.lower()}:{port}"


# --- settings classes ----------------------------------------------------------------------

REQUIRED = object()


class Setting:
    """One key of a settings class: its default (REQUIRED if it has none) and its check."""

    def __init__(self, default, check):
        self.default = default
        self.check = check


class InvalidSettings(ValueError):
    """Every refused key at once, as (key, what is wrong) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"key {key!r}: {message}" for key, message in problems))
        self.problems = problems


class Settings:
    """Frozen, validated settings: subclasses declare each key as a `Setting` class attribute.

    `Cls(**values)` checks every value and raises InvalidSettings naming each bad key;
    keys not declared are refused unless `unknown_keys_ignored`.
    """

    unknown_keys_ignored = False
    settings: dict[str, Setting] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.settings = {}
        for klass in reversed(cls.__mro__):
            cls.settings.update((name, value) for name, value in vars(klass).items() if isinstance(value, Setting))

    def __init__(self, /, **values):  # '/': a key named "self" is refused like any other unknown key
        problems = []
        for name, setting in self.settings.items():
            if name not in values:
                if setting.default is REQUIRED:
                    problems.append((name, "is required"))
                else:  # a copy: list defaults must not be shared between instances
                    self.__dict__[name] = list(setting.default) if isinstance(setting.default, list) else setting.default
                continue
            try:
                self.__dict__[name] = setting.check(values[name])
            except InvalidItem as exc:
                problems.append((f"{name}.{exc.index}", str(exc)))
            except ValueError as exc:
                problems.append((name, str(exc)))
        if not self.unknown_keys_ignored:
            problems += [(key, "is not a known key (see README, Configuration)") for key in values if key not in self.settings]
        if not problems:  # rules between keys, once each key is valid
            problems = self.conflicts()
        if problems:
            raise InvalidSettings(problems)

    def conflicts(self) -> list[tuple[str, str]]:
        """Rules that involve more than one key, as (key, what is wrong) pairs."""
        return []

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def replace(self, **changes) -> Settings:
        return type(self)(**{**self.__dict__, **changes})

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is frozen; use replace()")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # lists inside: not hashable, like the lists themselves

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{key}={value!r}" for key, value in self.__dict__.items()) + ")"


class VolumeConfig(Settings):
    """The `[luks]` section of luks-cryptdev.ini, as fast-luks writes it; other keys are ignored."""

    unknown_keys_ignored = True

    uuid = Setting(REQUIRED, text(r"[0-9A-Fa-f-]{8,64}", "8 to 64 hex digits or '-'"))
    cryptdev = Setting(REQUIRED, text(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,126}", "a letter or digit, then up to 126 of A-Z a-z 0-9 _ . + -"))
    mountpoint = Setting(REQUIRED, absolute_path)
    filesystem = Setting("ext4", text(r"[a-z0-9]{1,16}", "1 to 16 of a-z 0-9"))
    device = Setting(None, optional(string))
    mapper = Setting(None, optional(string))
    cipher_algorithm = Setting(None, optional(string))
    hash_algorithm = Setting(None, optional(string))
    keysize = Setting(None, optional(string))
    header_path = Setting(None, optional(absolute_path))  # root restores a header from it: never relative to a cwd

    def conflicts(self) -> list[tuple[str, str]]:
        if self.mapper and self.mapper != self.mapper_path:
            return [("mapper", f"is {self.mapper!r} but cryptdev implies {self.mapper_path!r}")]
        return []

    @property
    def device_path(self) -> str:
        return f"/dev/disk/by-uuid/{self.uuid}"

    @property
    def mapper_path(self) -> str:
        return f"/dev/mapper/{self.cryptdev}"


class JsonConfig(Settings):
    """Keys both config.json kinds share."""

    LUKSCTL_BINARY = Setting(LUKSCTL_BINARY, absolute_path)
    # Defence in depth behind the firewall: None lets every address in.
    ALLOWED_CLIENTS = Setting(None, optional(list_of(network)))
    # gunicorn refuses to start without --certfile unless this is true.
    ALLOW_PLAIN_HTTP = Setting(False, boolean)
    # How long the privileged call may take: cryptsetup's PBKDF alone is ~2 s by design.
    PRIVILEGED_TIMEOUT = Setting(180.0, number(gt=0, le=600))
    # GET /metrics shares ALLOWED_CLIENTS with the dashboard: a site that cannot scrape it
    # from there, or will not show those clients its worker addresses and failure counts, turns it off.
    METRICS = Setting(True, boolean)


class FrontendConfig(JsonConfig):
    """config.json of the front-end node (PROTOCOL §4), plus optional keys of ours."""

    INFRASTRUCTURE_CONFIGURATION = Setting("single_vm", one_of("single_vm", "cluster"))
    VIRTUALIZATION_TYPE = Setting(None, optional(one_of("docker", "none")))
    WN_IPS = Setting([], list_of(host))
    NFS_SERVICE = Setting(None, optional(text(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}", "a systemd unit name: a letter or digit, then up to 127 of A-Z a-z 0-9 _ . @ -")))
    CRYPTDEV_INI = Setting(str(VOLUME_INI), absolute_path)
    # What `luksctl open` passes to `mount -o`.
    MOUNT_OPTIONS = Setting("nosuid,nodev", text(r"[A-Za-z0-9_=,.-]{1,256}", "1 to 256 of A-Z a-z 0-9 _ = , . -"))
    VAULT_TLS_VERIFY = Setting(True, boolean)
    VAULT_CA_BUNDLE = Setting(None, optional(absolute_path))
    VAULT_TIMEOUT = Setting(10.0, number(gt=0, le=120))
    # One hard deadline for the whole Vault exchange of an open.
    VAULT_DEADLINE = Setting(30.0, number(gt=0, le=600))
    # The Vault servers a caller may name. Unset: open is refused unless ALLOW_ANY_VAULT_URL (the operator's written opt-out).
    VAULT_URL_ALLOWLIST = Setting(None, optional(list_of(normalize_vault_url)))
    ALLOW_ANY_VAULT_URL = Setting(False, boolean)
    # Where a wrapping token must have been created; [] skips the check.
    WRAPPING_CREATION_PATHS = Setting(["auth/token/create"], list_of(string))
    # Failed opens per client address before 429 (0 disables), and the window in seconds.
    FAILED_OPEN_LIMIT = Setting(5, integer(ge=0))
    FAILED_OPEN_WINDOW = Setting(300.0, number(gt=0))
    LOCK_FILE = Setting("/run/luksctl-api/open.lock", absolute_path)
    # Cluster: how the front end reaches the worker APIs (PROTOCOL §5).
    WN_SCHEME = Setting("https", one_of("https", "http"))
    WN_PORT = Setting(5000, integer(ge=1, le=65535))
    WN_TLS_VERIFY = Setting(True, boolean)
    WN_CA_BUNDLE = Setting(None, optional(absolute_path))
    WN_CONNECT_TIMEOUT = Setting(5.0, number(gt=0, le=60))
    WN_READ_TIMEOUT = Setting(60.0, number(gt=0, le=600))
    # At most one worker fan-out per this many seconds; concurrent or recent requests share the last result.
    FANOUT_MIN_INTERVAL = Setting(10.0, number(ge=0))
    CLUSTER_TOKEN_FILE = Setting(CLUSTER_TOKEN, absolute_path)

    def conflicts(self) -> list[tuple[str, str]]:
        if self.is_cluster and not self.WN_IPS:
            return [("WN_IPS", "is empty but INFRASTRUCTURE_CONFIGURATION is 'cluster'")]
        return []

    @property
    def restarts_docker(self) -> bool:
        return self.VIRTUALIZATION_TYPE == "docker"

    @property
    def is_cluster(self) -> bool:
        return self.INFRASTRUCTURE_CONFIGURATION == "cluster"


class WorkerConfig(JsonConfig):
    """config.json of a worker node (PROTOCOL §5)."""

    NFS_MOUNTPOINT_LIST = Setting(REQUIRED, list_of(absolute_path, min_length=1))
    CLUSTER_TOKEN_FILE = Setting(CLUSTER_TOKEN, absolute_path)
    # Only for front ends too old to send the cluster token.
    ALLOW_UNAUTHENTICATED_NFS_MOUNT = Setting(False, boolean)


# --- files ---------------------------------------------------------------------------------


def ensure_root_owned(path: Path) -> None:
    """Refuse a file that a non-root user could have written: root acts on what it says."""
    if path.is_symlink():  # its target's directory, not /etc/luks, decides who may replace it
        raise ConfigError(f"{path} is a symbolic link; it must be a regular file owned by root")
    for checked in (path, path.parent):
        info = checked.stat()
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"{checked} must be owned by root and not writable by group or others "
                f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})"
            )


def require_private_directory(directory: Path, owner: int) -> None:
    """The services' runtime directory (the open lock, failed-opens.sqlite, the fan-out results)
    must be `owner`'s and writable by nobody else: a local user who can write there could plant a
    fan-out result, or a sqlite file with triggers. One not made yet passes: systemd makes it at
    start (RuntimeDirectory=, the unit's user and mode), and the services check it again then."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{directory} must be a directory of the service user (uid {owner}), writable by nobody else "
                          f"(it has uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}{'' if stat.S_ISDIR(info.st_mode) else ', not a directory'})")


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
        return VolumeConfig(**dict(parser.items("luks")))
    except InvalidSettings as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_json_config(model: type[JsonConfig], path: Path, *, root_owned: bool = False, missing_ok: bool = False) -> JsonConfig:
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
        return model(**data)
    except InvalidSettings as exc:
        raise ConfigError(f"{path}: {exc}") from None


def api_config_path() -> Path:
    return Path(os.environ.get(API_CONFIG_ENV) or API_CONFIG)


def load_api_config(model: type[JsonConfig]) -> JsonConfig:
    """The service's config.json; only the default path may be absent (then: single_vm defaults)."""
    return load_json_config(model, api_config_path(), missing_ok=API_CONFIG_ENV not in os.environ)


def plain_http_allowed() -> bool:
    """Read before the app (and its settings) is loaded, by gunicorn's on_starting hook."""
    try:
        return json.loads(api_config_path().read_text()).get("ALLOW_PLAIN_HTTP") is True
    except (OSError, ValueError, AttributeError):
        return False
