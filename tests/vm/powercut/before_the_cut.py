"""Boot 1 of the power-cut pair (scripts/vm-powercut.sh), run by guest.sh as root.

On the persistent disk: OpenBao (raft storage), then one volume for each step of setup and rotate
(persistent_disk.CUT_POINTS), each command in a mount namespace of its own (its /etc/luks, its
lock files) and stopped at its step by a shim, started once the one before is stopped; then an online `luksctl
reencrypt` of one more volume, mounted, with reference data synced. CUT_AFTER_SECONDS after the
re-encryption's device stack appears, every other command still stopped at its step: a hard reset
with no sync (sysrq b). What reached the disk stays, the page cache is lost.

Before any command starts, the kernel is told to write nothing back by itself: no periodic
writeback, an ext4 commit every 600 s, no flush on a rename over a file. So what survives the cut
is what the commands fsynced, which is the promise under test, and not the page cache's timing.
The notes tell boot 2 what to expect; a failure before the cut leaves notes without "cut", which
boot 2 reports.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_vm import CRYPTSETUP, LUKS_DIR, MOUNTPOINT, OUT, SERVICE_PATH, VOLUME_INI, mapped, run, token_file, volume_key_digest  # noqa: E402
from persistent_disk import (  # noqa: E402
    CRYPTDEV, CUT_AFTER_SECONDS, CUT_POINTS, LUKS_PARTITION, LUKSCTL, PASSPHRASE, PERSIST, ROTATE_POLICY, ROTATE_RULES, SERVICE_ENV, STATE_PARTITION,
    UNREACHABLE_VAULT, CutPoint, attach, fsync_file_and_directory, mount_persistent, persistent_bao, rotate_argv, setup_argv, the_volume,
    wrapping_token_file, write_notes)
from support.shim import install_shim  # noqa: E402

from luksctl.root.cli import LOCK_FILE, SETUP_LOCK  # noqa: E402

REFERENCE_SIZE = 8 << 20
FAST_SLOT = ["--pbkdf", "pbkdf2", "--iter-time", "1"]
# Where a command stops: each point's namespace binds its own line over this empty file.
STOP_AT = Path("/srv/powercut/stop-at")
STOPPED = Path("/srv/powercut/stopped")  # a shim marks its command stopped here (not on the persistent disk)
SHIMMED = ("cryptsetup", "mkfs.ext4", "mount")
REAL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
STOP_WAIT = 300  # for one command to reach its step, under emulation
# STOP_AT's line: point number|tool|before or after|sh case pattern for " $* ". The shim stops
# luksctl (its parent) too: left running, luksctl's own deadline for the tool would end the step.
SHIM = """IFS='|' read -r point tool when pattern < {stop_at}
if [ "$tool" = {tool} ]; then
    case " $* " in
    $pattern)
        if [ "$when" = before ]; then : > "{stopped}/$point"; kill -STOP $PPID $$; exec {real} "$@"; fi
        {real} "$@"; status=$?; : > "{stopped}/$point"; kill -STOP $PPID $$; exit $status ;;
    esac
fi
exec {real} "$@"
"""


def write_back_nothing_by_itself() -> None:
    for name, value in (("dirty_ratio", 90), ("dirty_background_ratio", 80), ("dirty_writeback_centisecs", 0),
                        ("dirty_expire_centisecs", 360000)):
        Path(f"/proc/sys/vm/{name}").write_text(f"{value}\n")


def install_stopping_shims() -> None:
    STOP_AT.parent.mkdir(parents=True, exist_ok=True)
    STOP_AT.write_text("")
    STOPPED.mkdir(exist_ok=True)
    for tool in SHIMMED:
        install_shim(tool, SHIM.format(stop_at=STOP_AT, stopped=STOPPED, tool=tool, real=shutil.which(tool, path=REAL_PATH)))


def start_at_its_point(point: CutPoint, vault, rotate_token: str) -> subprocess.Popen:
    """The point's command in a mount namespace where /etc/luks, luksctl's two lock files and
    STOP_AT are the point's own: each stays stopped at its step beside the others."""
    own = point.directory
    (own / "luks").mkdir(parents=True)
    for name in ("open.lock", "setup.lock"):
        (own / name).touch()
    (own / "stop-at").write_text(f"{point.number}|{point.tool}|{point.when}|{point.pattern}\n" if point.tool else "")
    mount = shutil.which("mount", path=REAL_PATH)  # not the shim: these binds are the harness's

    def bind(what: Path, where: Path) -> str:
        return shlex.join([mount, "--bind", str(what), str(where)])

    setup = shlex.join(setup_argv(point, vault.url if point.tool else UNREACHABLE_VAULT, wrapping_token_file(point, vault)))
    script = ["set -e", bind(own / "luks", LUKS_DIR), bind(own / "open.lock", LOCK_FILE), bind(own / "setup.lock", SETUP_LOCK)]
    if point.command == "rotate":  # set up first, to the end; then the rotation, stopped at its step
        script += [setup, f"ln -sfn ../../{Path(point.partition).name} /dev/disk/by-uuid/$({CRYPTSETUP} luksUUID {point.partition})",
                   bind(own / "stop-at", STOP_AT), "exec " + shlex.join(rotate_argv(point, vault.url, rotate_token))]
    else:
        script += [bind(own / "stop-at", STOP_AT), "exec " + setup]
    with (OUT / f"cut-point-{point.number:02d}.log").open("wb") as log:
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=SERVICE_ENV, start_new_session=True)


def wait_until_at_its_point(point: CutPoint, command: subprocess.Popen) -> None:
    deadline = time.monotonic() + STOP_WAIT
    while not (STOPPED / str(point.number)).exists():
        ended = command.poll()
        if point.tool is None and ended == 15:  # as it ends without Vault: the passphrase saved
            return
        if ended is not None:
            sys.exit(f"cut point {point.number} ({point.name}) exited {ended} before its step (see cut-point-{point.number:02d}.log)")
        if time.monotonic() > deadline:
            sys.exit(f"cut point {point.number} ({point.name}) not at its step after {STOP_WAIT} s")
        time.sleep(0.2)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    mount_persistent_fresh()
    vault = persistent_bao(OUT / "bao.log")
    vault.start()
    vault.put_policy(ROTATE_POLICY, ROTATE_RULES)
    run("sync")  # the layout so far; from here on, only what is fsynced (not `sync`: it would flush the commands' files too)
    write_back_nothing_by_itself()
    install_stopping_shims()
    Path("/dev/disk/by-uuid").mkdir(parents=True, exist_ok=True)
    for lock in (LOCK_FILE, SETUP_LOCK):
        lock.touch()
    rotate_token = token_file(vault, ROTATE_POLICY)
    for point in CUT_POINTS:  # one at a time: side by side on one emulated CPU, Vault answers took over setup's 10 s
        wait_until_at_its_point(point, start_at_its_point(point, vault, rotate_token))

    run(CRYPTSETUP, "luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--batch-mode",
        "--key-file=-", LUKS_PARTITION, input=PASSPHRASE)
    volume = the_volume(run(CRYPTSETUP, "luksUUID", LUKS_PARTITION).stdout.decode().strip())
    volume.link_by_uuid()
    run("mount", "--bind", str(PERSIST / "luks"), str(LUKS_DIR))
    volume.write_ini()
    fsync_file_and_directory(VOLUME_INI)
    run(CRYPTSETUP, "open", "--key-file=-", LUKS_PARTITION, CRYPTDEV, input=PASSPHRASE)
    run("mkfs.ext4", "-q", volume.mapper)
    MOUNTPOINT.mkdir(exist_ok=True)
    run("mount", volume.mapper, str(MOUNTPOINT))  # the cut points' namespaces, made before, do not see it
    reference = os.urandom(REFERENCE_SIZE)
    (MOUNTPOINT / "reference.bin").write_bytes(reference)
    fsync_file_and_directory(MOUNTPOINT / "reference.bin")
    notes = {"uuid": volume.uuid, "reference_sha256": hashlib.sha256(reference).hexdigest(),
             "volume_key_digest": volume_key_digest(volume), "cut_points": [point.name for point in CUT_POINTS]}
    write_notes(notes)

    command = subprocess.Popen([LUKSCTL, "reencrypt", *FAST_SLOT], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": SERVICE_PATH})
    command.stdin.write(PASSPHRASE)
    command.stdin.close()
    deadline = time.monotonic() + 600
    while not mapped(f"{CRYPTDEV}-overlay"):
        if command.poll() is not None:
            sys.exit(f"luksctl reencrypt ended (exit {command.returncode}) before its device stack appeared: nothing to cut")
        if time.monotonic() > deadline:
            sys.exit("no re-encryption device stack after 600 s")
        time.sleep(0.01)
    time.sleep(CUT_AFTER_SECONDS)
    if command.poll() is not None:
        sys.exit(f"luksctl reencrypt ended (exit {command.returncode}) within {CUT_AFTER_SECONDS} s: nothing to cut mid-way")
    write_notes({**notes, "cut": f"{CUT_AFTER_SECONDS} s after the device stack appeared, the cut points at their steps"})
    Path("/proc/sys/kernel/sysrq").write_text("1\n")
    Path("/proc/sysrq-trigger").write_text("b\n")  # reboots at once: no sync, no unmount
    time.sleep(60)
    sys.exit("still running 60 s after sysrq b")


def mount_persistent_fresh() -> None:
    attach()
    run("mkfs.ext4", "-q", "-F", STATE_PARTITION)
    mount_persistent("commit=600", "noauto_da_alloc")


if __name__ == "__main__":
    sys.exit(main())
