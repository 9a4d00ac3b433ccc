"""deploy/: the sudoers drop-ins, the systemd units and gunicorn.conf.py as shipped."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from luksctl.api.privileged import SUDO
from luksctl.config import LUKSCTL_BINARY, FrontendConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUDOERS = {"luksctl-api": ("luksctl_api", {"open", "status"}), "luksctl-api-wn": ("luksctl_api_wn", {"nfs-mount"})}
UNITS = {"luksctl-api.service": ("luksctl_api", "create_frontend_app()"), "luksctl-api-wn.service": ("luksctl_api_wn", "create_worker_app()")}
PROXY_UNIT = "luksctl-proxy@.service"


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
    """Each key's value; a key given more than once (ExecStartPre=) keeps its values joined by newlines."""
    settings: dict[str, str] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            key = key.strip()
            settings[key] = f"{settings[key]}\n{value.strip()}" if key in settings else value.strip()
    return settings


def option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_serves_gunicorn_on_a_unix_socket_in_its_runtime_directory(name):
    user, factory = UNITS[name]
    settings = unit_settings(name)
    argv = shlex.split(settings["ExecStart"])

    assert Path(argv[0]).name == "gunicorn" and argv[0].startswith("/")
    assert option(argv, "--workers") == "2"
    assert option(argv, "--bind") == f"unix:/run/{settings['RuntimeDirectory']}/gunicorn.sock"
    # 0770 socket in a 0750 directory: the service's group (the proxy's workers) and no one else.
    assert option(argv, "-m") == "007" and settings["RuntimeDirectoryMode"] == "0750"
    assert "--certfile" not in argv and "--keyfile" not in argv  # TLS is the proxy's
    assert argv[-1] == f"luksctl.api:{factory}"
    assert settings["User"] == user
    assert "luksctl-proxy@%N.service" in settings["Wants"].split()


def test_proxy_unit_writes_checks_and_runs_its_own_nginx_configuration():
    settings = unit_settings(PROXY_UNIT)
    config = f"/run/{settings['RuntimeDirectory']}/nginx.conf"

    assert settings["RuntimeDirectory"] == "%i-proxy" and settings["PartOf"] == "%i.service"
    assert [shlex.split(line) for line in settings["ExecStartPre"].splitlines()] == [
        ["/opt/luksctl/venv/bin/%i", "proxy-config", "--output", config],
        ["/usr/sbin/nginx", "-t", "-q", "-c", config],
    ]
    assert shlex.split(settings["ExecStart"]) == ["/usr/sbin/nginx", "-c", config]


def test_proxy_unit_has_files_for_every_connection_nginx_allows():
    from luksctl.api import proxy

    settings = unit_settings(PROXY_UNIT)

    assert int(settings["LimitNOFILE"]) >= 2 * 2 * proxy.WORKER_CONNECTIONS  # 2 workers, 2 descriptors per proxied request
    assert settings["LimitCORE"] == "0" and settings["MemorySwapMax"] == "0"


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_files_for_every_connection_gunicorn_allows(name):
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))

    assert int(unit_settings(name)["LimitNOFILE"]) >= 8 * conf["worker_connections"]


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


def test_gunicorn_conf_runs_stock_gthread_with_its_connections_set():
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))

    assert conf["worker_class"] == "gthread" and conf["threads"] == 8
    assert conf["worker_connections"] == 64 and "post_worker_init" not in conf


def test_gunicorn_conf_sets_tls_1_2_minimum():
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))

    context = conf["ssl_context"](None, lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))

    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_gunicorn_conf_timeout_outlasts_a_privileged_call():
    from luksctl.config import FrontendConfig

    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))

    assert conf["timeout"] > FrontendConfig().PRIVILEGED_TIMEOUT


# --- Vault URL policy in the samples and install.sh (issue 10, item 3) -------------------------

FRONTEND_SAMPLES = ["single_vm", "docker", "cluster"]


@pytest.mark.parametrize("profile", FRONTEND_SAMPLES)
def test_install_writes_the_vault_urls_it_is_given_into_a_fresh_config(profile, capsys):
    from luksctl.api.admin import main_frontend

    sample = DEPLOY / "config" / f"{profile}.json"

    assert main_frontend(["write-config", "--sample", str(sample), "--vault-url", "https://vault.one:8200", "--vault-url", "https://vault.two"]) == 0

    written = json.loads(capsys.readouterr().out)
    config = FrontendConfig(**written)
    assert config.VAULT_URL_ALLOWLIST == ["https://vault.one:8200", "https://vault.two:443"]
    assert not config.ALLOW_ANY_VAULT_URL
    assert {key: value for key, value in written.items() if key != "VAULT_URL_ALLOWLIST"} == {
        key: value for key, value in json.loads(sample.read_text()).items() if key != "VAULT_URL_ALLOWLIST"
    }


@pytest.mark.parametrize("profile", FRONTEND_SAMPLES)
def test_install_without_a_vault_url_writes_a_config_that_refuses_open_and_says_so(profile, capsys):
    """The sample's allowlist is an example (vault.example): it is not kept as if it were real."""
    from luksctl.api.admin import main_frontend

    assert main_frontend(["write-config", "--sample", str(DEPLOY / "config" / f"{profile}.json")]) == 0

    captured = capsys.readouterr()
    config = FrontendConfig(**json.loads(captured.out))
    assert config.VAULT_URL_ALLOWLIST is None and not config.ALLOW_ANY_VAULT_URL
    assert "open is refused until VAULT_URL_ALLOWLIST is set" in captured.err


@pytest.mark.parametrize("profile", FRONTEND_SAMPLES)
def test_samples_show_the_allowlist_key_with_an_example_url(profile):
    config = FrontendConfig(**json.loads((DEPLOY / "config" / f"{profile}.json").read_text()))

    assert config.VAULT_URL_ALLOWLIST == ["https://vault.example:8200"]


def test_write_config_refuses_a_vault_url_that_is_not_one(capsys):
    from luksctl.api.admin import main_frontend

    assert main_frontend(["write-config", "--sample", str(DEPLOY / "config" / "single_vm.json"), "--vault-url", "vault:8200/path"]) == 3
    assert "VAULT_URL_ALLOWLIST" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["frontend", "single_vm", "--vault-url"], ["frontend", "--vault"], ["frontend", "single_vm", "extra"]])
def test_install_sh_rejects_bad_arguments_before_doing_anything(argv):
    result = subprocess.run(["bash", str(DEPLOY / "install.sh"), *argv], capture_output=True, text=True, timeout=30)

    assert result.returncode == 64, result.stdout + result.stderr
    assert "--vault-url URL" in result.stderr and result.stdout == ""


def test_install_sh_hands_its_vault_urls_to_write_config():
    script = (DEPLOY / "install.sh").read_text()

    assert 'write-config --sample "$sample" ${vault_urls[@]+"${vault_urls[@]}"}' in script


# --- install.sh runs no unpinned code as root (issue 21, item 6) -----------------------------

def pip_calls(script: str) -> list[list[str]]:
    """The argv of every pip command in a shell script (continuation lines joined, comments dropped)."""
    calls = []
    for line in script.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        calls += [argv[index:] for index, word in enumerate(argv) if word == "pip" or word.endswith("/pip")]
    return calls


def unpinned_pip_calls(script: str) -> list[str]:
    """pip calls that could fetch or run code no lock file pins: each must check hashes, or build
    with the backend already installed (from requirements-build.lock, hashes checked) and take
    no dependencies, or install only wheel files."""
    problems, backend_pinned = [], False
    for argv in pip_calls(script):
        targets = [word for word in argv[2:] if not word.startswith("-")]
        if "--require-hashes" in argv:
            backend_pinned |= any(word.endswith("/requirements-build.lock") for word in argv)
        elif {"--no-build-isolation", "--no-deps"} <= set(argv) and backend_pinned:
            continue
        elif not (targets and all(word.endswith(".whl") for word in targets) and "--no-deps" in argv):
            problems.append(shlex.join(argv))
    return problems


def test_install_sh_installs_only_hash_pinned_code_and_builds_luksctl_with_the_pinned_backend():
    script = (DEPLOY / "install.sh").read_text()

    assert unpinned_pip_calls(script) == []
    assert [argv[1:] for argv in pip_calls(script)] == [
        ["install", "--quiet", "--require-hashes", "-r", "$repo/requirements.lock", "-r", "$repo/requirements-build.lock"],
        ["install", "--quiet", "--upgrade", "--no-deps", "--no-build-isolation", "$repo[server]"],
    ]


@pytest.mark.parametrize("line", [
    '"$prefix/venv/bin/pip" install --quiet --upgrade --no-deps "$repo"',  # builds with an unpinned setuptools
    '"$prefix/venv/bin/pip" install --no-build-isolation --no-deps "$repo"',  # no pinned backend installed first
    '"$prefix/venv/bin/pip" install -r "$repo/requirements.lock"',  # no hashes checked
    '"$prefix/venv/bin/python" -m pip install \\\n    "$repo/dist/luksctl-1.0.0-py3-none-any.whl"',  # its dependencies unpinned
])
def test_an_unpinned_pip_call_is_found(line):
    assert unpinned_pip_calls(line) == [shlex.join(pip_calls(line)[0])]


def test_the_vm_wheelhouse_downloads_every_lock_install_sh_installs():
    """The systemd VM boot runs install.sh offline from scripts/build-wheelhouse.sh's wheelhouse."""
    def locks(path: Path, command: str) -> set[str]:
        return {argv[index + 1].rsplit("/", 1)[-1] for argv in pip_calls(path.read_text()) if argv[1] == command
                for index, word in enumerate(argv) if word == "-r"}

    installed = locks(DEPLOY / "install.sh", "install")
    downloaded = locks(DEPLOY.parent / "scripts" / "build-wheelhouse.sh", "download")

    assert installed == {"requirements.lock", "requirements-build.lock"}
    assert installed <= downloaded
