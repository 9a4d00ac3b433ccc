"""README promises about the privileged side, held on the real thing: the installed `luksctl`,
the shipped sudoers rule, real users, the guest's /etc/luks.

- Files: luksctl acts only on root-owned, non-writable /etc/luks files, never a symlink, and
  reads its config from /etc/luks whatever its environment says.
- Only root may run it; luksctl_api may run `luksctl --json open|status` and nothing else.

No volume is needed: a volume description whose disk is absent is enough to see what luksctl
decides, and every process start costs seconds here.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers_vm import API_CONFIG, SERVICE_PATH, VOLUME_INI

LUKSCTL = "/usr/local/sbin/luksctl"  # the path the sudoers rule names
ABSENT_UUID = "0b2e6f5e-0000-4000-8000-0000000000a1"
NOBODY = pwd.getpwnam("nobody")
ELSEWHERE = Path("/srv/promises")  # owned by nobody: whoever owns it may swap what is in it
NOT_ROOT = "this command must run as root (sudo luksctl ...)"
PASSWORD_REQUIRED = b"sudo: a password is required\n"


def call(*argv: str, user: pwd.struct_passwd | None = None, stdin: bytes = b"",
         **env: str) -> subprocess.CompletedProcess:
    """argv as root, or as `user`, with what a systemd service gets as environment (plus env)."""
    if user is not None:
        argv = ("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *argv)
    environment = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent", **env}
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=300, env=environment)


def luksctl(*args: str, **kwargs) -> tuple[int, dict]:
    """(exit code, the --json report) of the installed luksctl."""
    result = call(LUKSCTL, "--json", *args, **kwargs)
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def paper_volume():
    """/etc/luks/luks-cryptdev.ini for a disk that is not attached, root-owned and 0644."""
    VOLUME_INI.unlink(missing_ok=True)
    VOLUME_INI.write_text(f"[luks]\nuuid = {ABSENT_UUID}\ncryptdev = promisesvol\nmountpoint = /srv/promises-mnt\n")
    VOLUME_INI.chmod(0o644)
    os.chown(VOLUME_INI, 0, 0)
    yield VOLUME_INI
    VOLUME_INI.unlink(missing_ok=True)
    shutil.rmtree(ELSEWHERE, ignore_errors=True)


def make_group_writable(ini: Path) -> str:
    ini.chmod(0o664)
    return f"{ini} must be owned by root and not writable by group or others (owner uid 0, mode 664)"


def give_to_nobody(ini: Path) -> str:
    os.chown(ini, NOBODY.pw_uid, NOBODY.pw_gid)
    return f"{ini} must be owned by root and not writable by group or others (owner uid {NOBODY.pw_uid}, mode 644)"


def replace_by_a_symlink(ini: Path) -> str:
    """A root-owned 0644 target, but in a directory nobody owns: the link is what is refused."""
    ELSEWHERE.mkdir(exist_ok=True)
    target = ELSEWHERE / ini.name
    shutil.copy(ini, target)
    target.chmod(0o644)
    os.chown(ELSEWHERE, NOBODY.pw_uid, NOBODY.pw_gid)
    ini.unlink()
    ini.symlink_to(target)
    return f"{ini} is a symbolic link; it must be a regular file owned by root"


@pytest.mark.parametrize("make_unsafe", [make_group_writable, give_to_nobody, replace_by_a_symlink],
                         ids=["group-writable", "owned-by-another-user", "symlink"])
def test_luksctl_refuses_a_volume_description_another_user_could_write(paper_volume, make_unsafe):
    expected = make_unsafe(paper_volume)
    code, report = luksctl("status")
    assert (code, report["volume_state"], report["error"]) == (3, "unavailable", expected), report


def test_luksctl_accepts_the_same_description_root_owned(paper_volume):
    """The control for the three refusals above: only the unsafe detail made the difference."""
    code, report = luksctl("status")
    assert (code, report["volume_state"]) == (1, "unmounted"), report


def test_luksctl_ignores_LUKSCTL_API_CONFIG_in_its_environment(paper_volume):
    """The services honour $LUKSCTL_API_CONFIG; the root CLI must not, or whoever sets its
    environment picks what root acts on. Here the named file is one luksctl would refuse (a
    cluster without WN_IPS): the open gets past the config to the absent disk instead."""
    saved = API_CONFIG.read_bytes() if API_CONFIG.exists() else None
    ELSEWHERE.mkdir(exist_ok=True)
    planted = ELSEWHERE / "config.json"
    planted.write_text(json.dumps({"INFRASTRUCTURE_CONFIGURATION": "cluster"}))
    planted.chmod(0o644)
    API_CONFIG.write_text(json.dumps({"INFRASTRUCTURE_CONFIGURATION": "single_vm"}))
    API_CONFIG.chmod(0o644)
    try:
        code, report = luksctl("open", stdin=b"some passphrase\n", LUKSCTL_API_CONFIG=str(planted))
    finally:
        if saved is None:
            API_CONFIG.unlink()
        else:
            API_CONFIG.write_bytes(saved)
    assert str(planted) not in report.get("error", ""), report
    assert (code, report["error"]) == (
        4, f"LUKS device /dev/disk/by-uuid/{ABSENT_UUID} (uuid from the ini file) is not attached"), report


@pytest.mark.parametrize("command", ["open", "close"])
def test_luksctl_refuses_a_caller_that_is_not_root(paper_volume, command):
    code, report = luksctl(command, user=NOBODY, stdin=b"some passphrase\n")
    assert (code, report["error"]) == (4, NOT_ROOT), report


# The sudoers rule, exactly as shipped (guest.sh installs deploy/sudoers.d/*). sudo matches a
# command by the file it is, so the link's target (/opt/luksctl/venv/bin/luksctl) with the same
# arguments is the same permitted command, not another binary.
REFUSED_TO_THE_SERVICE_USER = {
    "close": [LUKSCTL, "close"],
    "json-close": [LUKSCTL, "--json", "close"],
    "json-open-with-an-argument": [LUKSCTL, "--json", "open", "X"],
    "open-without-json": [LUKSCTL, "open"],
    "status-without-json": [LUKSCTL, "status"],
    "json-nfs-mount": [LUKSCTL, "--json", "nfs-mount"],
    "another-binary": ["/usr/bin/id"],
    "a-shell": ["/bin/sh", "-c", "id"],
}


def test_the_service_user_may_sudo_nothing_but_json_open_and_status(paper_volume):
    user = pwd.getpwnam("luksctl_api")
    # The control: sudo works for this user, and the rule's own command runs as root.
    allowed = call("sudo", "-n", LUKSCTL, "--json", "status", user=user)
    assert (allowed.returncode, json.loads(allowed.stdout)["volume_state"]) == (1, "unmounted"), allowed
    ran = {}
    for name, argv in REFUSED_TO_THE_SERVICE_USER.items():
        result = call("sudo", "-n", *argv, user=user)
        ran[name] = (result.returncode, result.stdout, result.stderr)
    refused = {name: (1, b"", PASSWORD_REQUIRED) for name in REFUSED_TO_THE_SERVICE_USER}
    assert ran == refused
