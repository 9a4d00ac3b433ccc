"""config.py: the ini and JSON files become validated models; errors name the file and key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from luksctl import config
from luksctl.config import FrontendConfig, WorkerConfig, ensure_root_owned, load_api_config, load_json_config, load_volume_config
from luksctl.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "config"
NOBODY = 65534

GOOD_INI = """\
[luks]
uuid = 0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10
cryptdev = xkqzbmwe
mapper = /dev/mapper/xkqzbmwe
mountpoint = /export
filesystem = ext4
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def with_line(key: str, value: str) -> str:
    lines = [line for line in GOOD_INI.splitlines() if not line.startswith(f"{key} =")]
    return "\n".join(lines + [f"{key} = {value}"]) + "\n"


# --- luks-cryptdev.ini -------------------------------------------------------


def test_protocol_sample_with_inline_comments_and_extra_sections():
    volume = load_volume_config(FIXTURES / "luks-cryptdev.ini")

    assert volume.uuid == "0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10"
    assert volume.cryptdev == "xkqzbmwe"
    assert volume.mapper == "/dev/mapper/xkqzbmwe"
    assert volume.mountpoint == "/export"
    assert volume.filesystem == "ext4"
    assert volume.device == "/dev/vdb"
    assert volume.header_path == "/etc/luks/luks-header.bck"
    assert volume.device_path == "/dev/disk/by-uuid/0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10"
    assert volume.mapper_path == "/dev/mapper/xkqzbmwe"


def test_deploy_ini_sample_loads():
    assert load_volume_config(DEPLOY_CONFIG / "luks-cryptdev.ini").cryptdev == "xkqzbmwe"


def test_filesystem_defaults_to_ext4(tmp_path):
    text = "\n".join(line for line in GOOD_INI.splitlines() if not line.startswith("filesystem")) + "\n"

    assert load_volume_config(write(tmp_path, "v.ini", text)).filesystem == "ext4"


def test_mountpoint_is_normalised(tmp_path):
    assert load_volume_config(write(tmp_path, "v.ini", with_line("mountpoint", "/export//data/"))).mountpoint == "/export/data"


@pytest.mark.parametrize(
    "key, value",
    [
        ("uuid", "0b2e; rm -rf /"),
        ("uuid", "abc"),
        ("cryptdev", "../evil"),
        ("cryptdev", "name with space"),
        ("mountpoint", "export"),
        ("mountpoint", "/export/../etc"),
        ("header_path", "luks-header.bck"),  # header restore would read it relative to wherever root ran it
        ("header_path", "/etc/luks/../../tmp/luks-header.bck"),
        ("filesystem", "ext4 -o exec"),
    ],
)
def test_bad_value_names_file_and_key(tmp_path, key, value):
    path = write(tmp_path, "luks-cryptdev.ini", with_line(key, value))

    with pytest.raises(ConfigError) as caught:
        load_volume_config(path)

    assert str(path) in caught.value.message
    assert repr(key) in caught.value.message


def test_missing_required_key_is_named(tmp_path):
    text = "\n".join(line for line in GOOD_INI.splitlines() if not line.startswith("uuid")) + "\n"
    path = write(tmp_path, "v.ini", text)

    with pytest.raises(ConfigError, match="'uuid'"):
        load_volume_config(path)


def test_mapper_must_match_cryptdev(tmp_path):
    path = write(tmp_path, "v.ini", with_line("mapper", "/dev/mapper/somethingelse"))

    with pytest.raises(ConfigError) as caught:
        load_volume_config(path)

    assert str(path) in caught.value.message
    assert "/dev/mapper/somethingelse" in caught.value.message and "/dev/mapper/xkqzbmwe" in caught.value.message


def test_missing_luks_section(tmp_path):
    path = write(tmp_path, "v.ini", "[logs]\nlogdir = /var/log\n")

    with pytest.raises(ConfigError, match=r"\[luks\]") as caught:
        load_volume_config(path)

    assert str(path) in caught.value.message


def test_not_an_ini_file(tmp_path):
    path = write(tmp_path, "v.ini", "uuid = 1234\n")

    with pytest.raises(ConfigError) as caught:
        load_volume_config(path)

    assert str(path) in caught.value.message


def test_missing_ini_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_volume_config(tmp_path / "absent.ini")


# --- config.json -------------------------------------------------------------


def test_frontend_defaults():
    frontend = FrontendConfig()

    assert frontend.INFRASTRUCTURE_CONFIGURATION == "single_vm"
    assert not frontend.restarts_docker and not frontend.is_cluster
    assert frontend.LUKSCTL_BINARY == "/usr/local/sbin/luksctl"
    assert frontend.VAULT_TLS_VERIFY is True


def test_mount_options_default_to_nosuid_nodev():
    assert FrontendConfig().MOUNT_OPTIONS == "nosuid,nodev"
    assert FrontendConfig(MOUNT_OPTIONS="nosuid,nodev,noexec,commit=30").MOUNT_OPTIONS == "nosuid,nodev,noexec,commit=30"


@pytest.mark.parametrize("bad", ["", "nosuid nodev", "nosuid;reboot", "x" * 257, "ro\n", "data=/etc/../x"])
def test_bad_mount_options_are_rejected_by_name(tmp_path, bad):
    path = write(tmp_path, "config.json", json.dumps({"MOUNT_OPTIONS": bad}))

    with pytest.raises(ConfigError, match="MOUNT_OPTIONS") as caught:
        load_json_config(FrontendConfig, path)

    assert str(path) in caught.value.message


def test_the_docker_sample_mounts_with_defaults():
    assert load_json_config(FrontendConfig, DEPLOY_CONFIG / "docker.json").MOUNT_OPTIONS == "defaults"


def test_frontend_unknown_key_is_rejected_by_name(tmp_path):
    path = write(tmp_path, "config.json", json.dumps({"INFRASTRUCTURE_CONFIGURATION": "single_vm", "VAULT_VERIFY": False}))

    with pytest.raises(ConfigError) as caught:
        load_json_config(FrontendConfig, path)

    assert "VAULT_VERIFY" in caught.value.message and str(path) in caught.value.message


def test_a_key_named_self_is_an_unknown_key_not_a_crash(tmp_path):
    """Settings(**values) once took "self" as its own argument: a TypeError, not the operator's error."""
    path = write(tmp_path, "config.json", json.dumps({"self": 1}))

    with pytest.raises(ConfigError) as caught:
        load_json_config(FrontendConfig, path)

    assert "key 'self': is not a known key" in caught.value.message


def test_cluster_without_worker_ips_is_rejected(tmp_path):
    path = write(tmp_path, "config.json", json.dumps({"INFRASTRUCTURE_CONFIGURATION": "cluster"}))

    with pytest.raises(ConfigError, match="WN_IPS"):
        load_json_config(FrontendConfig, path)


@pytest.mark.parametrize("bad", ["10.0.0.300", "host name", "http://10.0.0.2", "-rf", ""])
def test_bad_worker_ip_entry_is_rejected(tmp_path, bad):
    path = write(tmp_path, "config.json", json.dumps({"INFRASTRUCTURE_CONFIGURATION": "cluster", "WN_IPS": ["10.0.0.2", bad]}))

    with pytest.raises(ConfigError) as caught:
        load_json_config(FrontendConfig, path)

    assert "WN_IPS.1" in caught.value.message


def test_cluster_with_hosts_and_ips():
    frontend = FrontendConfig(INFRASTRUCTURE_CONFIGURATION="cluster", WN_IPS=["10.0.0.2", "wn-1.example.org", "fd00::2"])

    assert frontend.is_cluster and frontend.WN_IPS == ["10.0.0.2", "wn-1.example.org", "fd00::2"]


def test_unknown_infrastructure_value_is_rejected(tmp_path):
    path = write(tmp_path, "config.json", json.dumps({"INFRASTRUCTURE_CONFIGURATION": "kubernetes"}))

    with pytest.raises(ConfigError, match="INFRASTRUCTURE_CONFIGURATION"):
        load_json_config(FrontendConfig, path)


@pytest.mark.parametrize("text, problem", [("[]", "JSON object"), ("{not json", "not valid JSON")])
def test_json_file_must_hold_an_object(tmp_path, text, problem):
    path = write(tmp_path, "config.json", text)

    with pytest.raises(ConfigError, match=problem):
        load_json_config(FrontendConfig, path)


def test_worker_config():
    assert WorkerConfig(NFS_MOUNTPOINT_LIST=["/home", "/export/"]).NFS_MOUNTPOINT_LIST == ["/home", "/export"]


@pytest.mark.parametrize("mountpoints", [[], ["home"], ["/home/../etc"]])
def test_worker_config_rejects_bad_mountpoint_lists(tmp_path, mountpoints):
    path = write(tmp_path, "config.json", json.dumps({"NFS_MOUNTPOINT_LIST": mountpoints}))

    with pytest.raises(ConfigError, match="NFS_MOUNTPOINT_LIST"):
        load_json_config(WorkerConfig, path)


def test_worker_config_requires_the_mountpoint_list(tmp_path):
    with pytest.raises(ConfigError, match="NFS_MOUNTPOINT_LIST"):
        load_json_config(WorkerConfig, write(tmp_path, "config.json", "{}"))


DEPLOY_MODELS = {"worker.json": WorkerConfig}


@pytest.mark.parametrize("sample", sorted(DEPLOY_CONFIG.glob("*.json")), ids=lambda path: path.name)
def test_every_deploy_json_sample_validates(sample):
    model = DEPLOY_MODELS.get(sample.name, FrontendConfig)

    assert isinstance(load_json_config(model, sample), model)


def test_deploy_samples_exist():
    assert {path.name for path in DEPLOY_CONFIG.glob("*.json")} >= {"single_vm.json", "docker.json", "cluster.json", "worker.json"}


# --- ownership ---------------------------------------------------------------


@pytest.fixture
def safe_dir(tmp_path) -> Path:
    directory = tmp_path / "luks"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    return directory


def test_root_owned_file_is_accepted(safe_dir):
    path = write(safe_dir, "luks-cryptdev.ini", GOOD_INI)
    path.chmod(0o644)

    ensure_root_owned(path)
    assert load_volume_config(path, root_owned=True).cryptdev == "xkqzbmwe"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_group_or_other_writable_file_is_refused(safe_dir, mode):
    path = write(safe_dir, "luks-cryptdev.ini", GOOD_INI)
    path.chmod(mode)

    with pytest.raises(ConfigError, match="owned by root") as caught:
        load_volume_config(path, root_owned=True)

    assert str(path) in caught.value.message
    # Refused for its mode, not its owner (the file is root's: these tests run as root).
    assert path.stat().st_uid == 0, "run as root: a file of another owner is refused whatever its mode"
    assert f"owner uid 0, mode {mode:o}" in caught.value.message, caught.value.message


def test_file_owned_by_another_user_is_refused(safe_dir):
    path = write(safe_dir, "config.json", "{}")
    path.chmod(0o644)
    os.chown(path, NOBODY, NOBODY)

    with pytest.raises(ConfigError, match="owned by root") as caught:
        load_json_config(FrontendConfig, path, root_owned=True)

    # Refused for its owner, not its mode (0644 is what a root-owned file may have).
    assert f"owner uid {NOBODY}, mode 644" in caught.value.message, caught.value.message


def test_writable_parent_directory_is_refused(safe_dir):
    path = write(safe_dir, "config.json", "{}")
    path.chmod(0o644)
    safe_dir.chmod(0o777)

    with pytest.raises(ConfigError) as caught:
        ensure_root_owned(path)

    assert str(safe_dir) in caught.value.message


def test_root_owned_check_is_skipped_when_not_asked(safe_dir):
    path = write(safe_dir, "config.json", "{}")
    os.chown(path, NOBODY, NOBODY)

    assert load_json_config(FrontendConfig, path).INFRASTRUCTURE_CONFIGURATION == "single_vm"


# --- load_api_config ---------------------------------------------------------


def test_api_config_defaults_when_the_default_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(config.API_CONFIG_ENV, raising=False)
    monkeypatch.setattr(config, "API_CONFIG", tmp_path / "absent.json")

    assert load_api_config(FrontendConfig) == FrontendConfig()


def test_api_config_reads_the_default_file_when_present(tmp_path, monkeypatch):
    monkeypatch.delenv(config.API_CONFIG_ENV, raising=False)
    monkeypatch.setattr(config, "API_CONFIG", write(tmp_path, "config.json", '{"VIRTUALIZATION_TYPE": "docker"}'))

    assert load_api_config(FrontendConfig).restarts_docker


def test_api_config_named_by_environment_must_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "API_CONFIG", tmp_path / "absent-default.json")
    monkeypatch.setenv(config.API_CONFIG_ENV, str(tmp_path / "absent.json"))

    with pytest.raises(ConfigError, match="absent.json"):
        load_api_config(FrontendConfig)


def test_api_config_named_by_environment_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv(config.API_CONFIG_ENV, str(write(tmp_path, "wn.json", '{"NFS_MOUNTPOINT_LIST": ["/home"]}')))

    assert load_api_config(WorkerConfig).NFS_MOUNTPOINT_LIST == ["/home"]


# --- the keys agreed for open's deadline, fan-out, mount options and the allowlist opt-out ----


def test_agreed_frontend_keys_defaults():
    frontend = FrontendConfig()

    assert frontend.ALLOW_ANY_VAULT_URL is False
    assert frontend.VAULT_DEADLINE == 30
    assert frontend.FANOUT_MIN_INTERVAL == 10
    assert frontend.MOUNT_OPTIONS == "nosuid,nodev"


@pytest.mark.parametrize(
    "key, value",
    [("VAULT_DEADLINE", 600), ("VAULT_DEADLINE", 0.5), ("FANOUT_MIN_INTERVAL", 0), ("MOUNT_OPTIONS", "defaults"),
     ("MOUNT_OPTIONS", "noexec,uid=1000,context=x_y.z-1"), ("MOUNT_OPTIONS", "a" * 256), ("ALLOW_ANY_VAULT_URL", True)],
)
def test_agreed_frontend_keys_accept(tmp_path, key, value):
    path = write(tmp_path, "config.json", json.dumps({key: value}))

    assert getattr(load_json_config(FrontendConfig, path), key) == value


@pytest.mark.parametrize(
    "key, value",
    [("VAULT_DEADLINE", 0), ("VAULT_DEADLINE", 600.5), ("VAULT_DEADLINE", "30"), ("FANOUT_MIN_INTERVAL", -1),
     ("MOUNT_OPTIONS", ""), ("MOUNT_OPTIONS", "a" * 257), ("MOUNT_OPTIONS", "ro exec"), ("MOUNT_OPTIONS", "ro;reboot"),
     ("MOUNT_OPTIONS", "ro\n"), ("ALLOW_ANY_VAULT_URL", "true"), ("ALLOW_ANY_VAULT_URL", 1)],
)
def test_agreed_frontend_keys_refuse(tmp_path, key, value):
    path = write(tmp_path, "config.json", json.dumps({key: value}))

    with pytest.raises(ConfigError) as caught:
        load_json_config(FrontendConfig, path)

    assert str(path) in caught.value.message and repr(key) in caught.value.message


# --- JSON types, several problems, frozen settings ----------------------------------------------


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("VAULT_TLS_VERIFY", "false", "true or false"),  # a non-empty string would be truthy: never coerced
        ("WN_PORT", True, "whole number"),
        ("WN_PORT", 5000.5, "whole number"),
        ("FAILED_OPEN_LIMIT", "5", "whole number"),
        ("VAULT_TIMEOUT", float("nan"), "number > 0 and <= 120"),
        ("FAILED_OPEN_WINDOW", float("inf"), "number > 0"),
        ("WN_IPS", "10.0.0.2", "list"),
        ("VIRTUALIZATION_TYPE", "podman", "'docker', 'none'"),
    ],
)
def test_json_values_must_have_the_right_type(tmp_path, key, value, allowed):
    path = write(tmp_path, "config.json", json.dumps({key: value}))

    with pytest.raises(ConfigError) as caught:
        load_json_config(FrontendConfig, path)

    assert f"{path}: key {key!r}: must be" in caught.value.message and allowed in caught.value.message


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "config.json", json.dumps({"WN_PORT": 0, "VAULT_TIMEOUT": -1, "TYPO": 1}))

    with pytest.raises(ConfigError) as caught:
        load_json_config(FrontendConfig, path)

    assert all(repr(key) in caught.value.message for key in ("WN_PORT", "VAULT_TIMEOUT", "TYPO"))


def test_allowed_clients_are_networks(tmp_path):
    frontend = FrontendConfig(ALLOWED_CLIENTS=["192.0.2.0/24", "192.0.2.10", "fd00::/64"])

    assert [str(network) for network in frontend.ALLOWED_CLIENTS] == ["192.0.2.0/24", "192.0.2.10/32", "fd00::/64"]
    with pytest.raises(ConfigError, match="ALLOWED_CLIENTS.0"):
        load_json_config(FrontendConfig, write(tmp_path, "config.json", '{"ALLOWED_CLIENTS": ["192.0.2.10/24"]}'))


def test_settings_are_frozen_and_replace_validates_again():
    frontend = FrontendConfig()

    with pytest.raises(AttributeError):
        frontend.WN_PORT = 1
    assert frontend.replace(FAILED_OPEN_LIMIT=1).FAILED_OPEN_LIMIT == 1
    assert frontend.replace(FAILED_OPEN_LIMIT=1) != frontend
    with pytest.raises(config.InvalidSettings, match="FAILED_OPEN_LIMIT"):
        frontend.replace(FAILED_OPEN_LIMIT=-1)


def test_list_defaults_are_not_shared():
    assert FrontendConfig().WRAPPING_CREATION_PATHS is not FrontendConfig().WRAPPING_CREATION_PATHS


def test_check_config_prints_the_validated_settings(tmp_path, monkeypatch, capsys):
    from luksctl.api.admin import main_frontend

    path = write(tmp_path, "config.json", json.dumps({"WN_PORT": 5001, "ALLOWED_CLIENTS": ["192.0.2.0/24"]}))
    monkeypatch.setenv(config.API_CONFIG_ENV, str(path))

    assert main_frontend(["check-config"]) == 0

    printed = capsys.readouterr().out
    assert printed.startswith(f"{path}: OK {{")
    settings = json.loads(printed.split(" OK ", 1)[1])
    assert settings["WN_PORT"] == 5001 and settings["ALLOWED_CLIENTS"] == ["192.0.2.0/24"] and settings["MOUNT_OPTIONS"] == "nosuid,nodev"
