"""The power-cut pair's persistent disk (scripts/vm-powercut.sh makes it, vm-run.sh attaches it):
partition 1 an ext4 holding /etc/luks, OpenBao's storage, each cut point's /etc/luks and the first
boot's notes; partition 2 the re-encrypted LUKS volume; partitions 3 on, one for each cut point
of setup and rotate (CUT_POINTS). Both boots mount it the same way, so the second sees exactly
what the cut left on the disk."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers_vm import LUKS_DIR, MOUNTPOINT, SERVICE_PATH, Bao, Volume, run, wait_until
from support.secret_file import write_secret_file

STATE_PARTITION = "/dev/vda1"  # vng --disk attaches a virtio-blk disk; the root is 9p
LUKS_PARTITION = "/dev/vda2"
PERSIST = Path("/srv/persist")  # / is read-only in the guest; /srv is a writable overlay
NOTES = PERSIST / "notes.json"  # what the first boot did, for the second to check
PASSPHRASE = b"power cut passphrase"  # a test volume's; the second boot stores it in its own OpenBao
CRYPTDEV = "powercut"
CUT_AFTER_SECONDS = 2  # after the re-encryption's device stack appears: into the data, past the first hotzone
BAO_PORT = 8207  # fixed: the cut points' commands recorded nothing of it, but the API's allowlist names it
LUKSCTL = "/usr/local/sbin/luksctl"
SETUP_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
ROTATE_PBKDF = ["--pbkdf", "pbkdf2", "--iter-time", "1"]
ROTATE_POLICY = "powercut-rotate"
ROTATE_RULES = 'path "secrets/data/*" { capabilities = ["read", "update"] }'
UNREACHABLE_VAULT = "http://127.0.0.1:1"
SERVICE_ENV = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}  # what sudo or a unit gives luksctl


@dataclass(frozen=True)
class CutPoint:
    """A step of setup or rotate where one volume stops (the first boot) until the power cut.

    tool: the program whose shim stops the command, on a call whose arguments match `pattern` (a sh
    case pattern, against " $* "), before or `after` it ran; None: the command is not stopped but
    ends, as it does when Vault cannot be reached. A rotate point's volume is set up first, to the end."""

    number: int
    command: str  # "setup" | "rotate"
    step: str  # where it stops, for people
    tool: str | None = None
    pattern: str = "*"
    when: str = "after"

    @property
    def name(self) -> str:
        return f"{self.command}, {self.step}"

    @property
    def partition(self) -> str:
        return f"/dev/vda{self.number + 2}"

    @property
    def cryptdev(self) -> str:
        return f"cut{self.number:02d}"

    @property
    def directory(self) -> Path:
        """Its /etc/luks (luks/), its two lock files and the line that tells the shims where it stops."""
        return PERSIST / "points" / f"{self.number:02d}"

    @property
    def secret_path(self) -> str:
        return f"powercut-sub/cut-point-{self.number:02d}/storage_encryption"


# The partitions' order (vda3 on): setup's steps, then rotate's, each stopped just before or just
# after a program ran (README: "Crash recovery" and "How rotation stays safe" list the steps).
CUT_POINTS = [
    CutPoint(1, "setup", "Vault unreachable: the passphrase saved, nothing else"),
    CutPoint(2, "setup", "before luksFormat", "cryptsetup", "* luksFormat *", "before"),
    CutPoint(3, "setup", "after luksFormat", "cryptsetup", "* luksFormat *"),
    CutPoint(4, "setup", "after the header backup", "cryptsetup", "* luksHeaderBackup *"),
    CutPoint(5, "setup", "before the open (the ini written)", "cryptsetup", "* open * cut05 *", "before"),  # not --test-passphrase
    CutPoint(6, "setup", "before mkfs", "mkfs.ext4", when="before"),
    CutPoint(7, "setup", "after mkfs", "mkfs.ext4"),
    CutPoint(8, "setup", "after the mount", "mount"),
    CutPoint(9, "rotate", "before luksAddKey", "cryptsetup", "* luksAddKey *", "before"),
    CutPoint(10, "rotate", "after luksAddKey", "cryptsetup", "* luksAddKey *"),
    CutPoint(11, "rotate", "before luksKillSlot (Vault written)", "cryptsetup", "* luksKillSlot *", "before"),
    CutPoint(12, "rotate", "after luksKillSlot", "cryptsetup", "* luksKillSlot *"),
    CutPoint(13, "rotate", "after the new header backup", "cryptsetup", "* luksHeaderBackup *"),
]


def setup_argv(point: CutPoint, vault_url: str, token_file: str | None) -> list[str]:
    token = ["--wrapping-token-file", token_file] if token_file else []
    return [LUKSCTL, "--json", "setup", "--device", point.partition, "--cryptdev", point.cryptdev, "--mountpoint", str(MOUNTPOINT),
            *SETUP_PBKDF, "--vault-url", vault_url, "--vault-allow-http", "--secret-path", point.secret_path, *token]


def rotate_argv(point: CutPoint, vault_url: str, token_file: str) -> list[str]:
    return [LUKSCTL, "--json", "rotate", *ROTATE_PBKDF, "--vault-url", vault_url, "--vault-allow-http",
            "--secret-path", point.secret_path, "--token-file", token_file]


def wrapping_token_file(point: CutPoint, vault) -> str:
    """A new write-only wrapping token for the point's setup (the dashboard's, PROTOCOL §7), root-only in /run."""
    return write_secret_file(Path(f"/run/powercut-token-{point.number:02d}"), vault.write_only_wrapping_token())


def persistent_bao(log: Path) -> Bao:
    """OpenBao with raft storage on the persistent disk: what the first boot wrote, the second reads."""
    return Bao(log, storage=PERSIST / "bao", port=BAO_PORT)


@contextlib.contextmanager
def etc_luks(directory: Path) -> Iterator[None]:
    """`directory` as /etc/luks until the block ends: the API and luksctl see that volume's files."""
    run("mount", "--bind", str(directory), str(LUKS_DIR))
    try:
        yield
    finally:
        run("umount", str(LUKS_DIR))


def attach() -> None:
    """The disk's driver, then its partitions' nodes (devtmpfs makes them; there is no udev)."""
    run("modprobe", "virtio_blk")
    wait_until(lambda: Path(LUKS_PARTITION).exists(), 60, f"{LUKS_PARTITION} (is VM_DISK attached?)")


def mount_persistent(*options: str) -> None:
    attach()
    PERSIST.mkdir(exist_ok=True)
    run("mount", *(["-o", ",".join(options)] if options else []), STATE_PARTITION, str(PERSIST))
    (PERSIST / "luks").mkdir(mode=0o755, exist_ok=True)


def the_volume(uuid: str) -> Volume:
    return Volume(PASSPHRASE, Path(LUKS_PARTITION), LUKS_PARTITION, uuid=uuid, cryptdev=CRYPTDEV)


def fsync_file_and_directory(path: Path) -> None:
    """The harness's own files, made durable one by one (os.fsync, not luksctl's durable.py, whose
    fsyncs a break of the product may remove)."""
    for name, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(name, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_notes(notes: dict) -> None:
    """Durably: a power cut may follow at once."""
    temporary = NOTES.with_suffix(".tmp")
    temporary.write_text(json.dumps(notes))
    fsync_file_and_directory(temporary)
    temporary.replace(NOTES)
    fsync_file_and_directory(NOTES)
