"""deploy/: the sudoers drop-ins, the systemd units and gunicorn.conf.py as shipped."""

from __future__ import annotations

import re
import runpy
import shlex
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from luksctl.config import LUKSCTL_BINARY
from luksctl.privileged import SUDO

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUDOERS = {"luksctl-api": ("luksctl_api", {"open", "status"}), "luksctl-api-wn": ("luksctl_api_wn", {"nfs-mount"})}
UNITS = {"luksctl-api.service": ("luksctl_api", "create_frontend_app()"), "luksctl-api-wn.service": ("luksctl_api_wn", "create_worker_app()")}


def visudo() -> str:
    path = shutil.which("visudo") or shutil.which("visudo", path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip("visudo is not installed (make test installs sudo)")
    return path


def grants(text: str) -> list[tuple[str, list[str]]]:
    """(user, commands) of every rule line; Defaults and comments are not rules."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "Defaults")):
            continue
        match = re.fullmatch(r"(\S+)\s+ALL=\(root\)\s+NOPASSWD:\s*(.+)", line)
        assert match, f"unexpected sudoers line: {line!r}"
        rules.append((match[1], [command.strip() for command in match[2].split(",")]))
    return rules


@pytest.mark.parametrize("name", sorted(SUDOERS))
def test_sudoers_file_passes_visudo(name):
    result = subprocess.run([visudo(), "-cf", str(DEPLOY / "sudoers.d" / name)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(SUDOERS))
def test_sudoers_grants_only_luksctl_with_fixed_arguments(name):
    user, actions = SUDOERS[name]

    rules = grants((DEPLOY / "sudoers.d" / name).read_text())

    assert [rule_user for rule_user, _ in rules] == [user]
    (_, commands), = rules
    assert {shlex.split(command)[0] for command in commands} == {"/usr/local/sbin/luksctl"}
    assert {tuple(shlex.split(command)[1:]) for command in commands} == {("--json", action) for action in actions}


@pytest.mark.parametrize("name", sorted(SUDOERS))
def test_sudoers_has_no_wildcards_or_extra_binaries(name):
    text = (DEPLOY / "sudoers.d" / name).read_text()
    rules_text = " ".join(" ".join(commands) for _, commands in grants(text))

    assert "*" not in rules_text and "systemctl" not in rules_text and "ALL" not in rules_text


def test_bridge_argv_is_what_the_frontend_sudoers_grants():
    (_, commands), = grants((DEPLOY / "sudoers.d" / "luksctl-api").read_text())

    assert SUDO == "/usr/bin/sudo"
    assert f"{LUKSCTL_BINARY} --json open" in commands


def unit_settings(name: str) -> dict[str, str]:
    settings = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_execstart_keeps_the_historic_gunicorn_flags(name):
    user, factory = UNITS[name]
    settings = unit_settings(name)
    argv = shlex.split(settings["ExecStart"])

    assert Path(argv[0]).name == "gunicorn" and argv[0].startswith("/")
    assert option(argv, "--workers") == "2"
    assert option(argv, "--bind") == "0.0.0.0:5000"
    assert option(argv, "-m") == "007"
    assert option(argv, "--certfile").startswith("/etc/luks/")
    assert option(argv, "--keyfile").startswith("/etc/luks/")
    assert argv[-1] == f"luksctl.api:{factory}"
    assert settings["User"] == user


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_keeps_secrets_out_of_core_dumps_and_swap(name):
    settings = unit_settings(name)

    assert settings.get("LimitCORE") == "0"
    assert settings.get("MemorySwapMax") == "0"


# Each gives the service a private mount namespace (the volume's mount would be invisible to
# the host), sets no_new_privs for a service with User= (sudo stops working) or takes from the
# process tree capabilities that mount and cryptsetup need as root.
BREAKS_MOUNT_OR_SUDO = {
    "NoNewPrivileges", "PrivateMounts", "PrivateTmp", "PrivateDevices", "PrivateUsers", "ProtectSystem",
    "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
    "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage",
    "MountAPIVFS", "DynamicUser", "SystemCallFilter", "SystemCallArchitectures", "RestrictNamespaces",
    "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RestrictAddressFamilies",
    "CapabilityBoundingSet",
}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_sets_nothing_that_would_hide_the_mount_or_stop_sudo(name):
    assert not BREAKS_MOUNT_OR_SUDO & set(unit_settings(name))


def test_gunicorn_conf_sets_tls_1_2_minimum():
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))

    context = conf["ssl_context"](None, lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))

    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_gunicorn_conf_timeout_outlasts_a_privileged_call():
    from luksctl.config import FrontendConfig

    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))

    assert conf["timeout"] > FrontendConfig().PRIVILEGED_TIMEOUT
