"""The one store of pending secrets: the passphrase of an unfinished setup or rotation, on disk
(and the secret-free state of an unfinished re-encryption, kept as carefully).

setup and rotate save a new passphrase here before anything depends on it and delete it
once it is stored where it belongs, so no kill or power loss leaves a volume whose
passphrase is nowhere. The files are root's, mode 0600, read with O_NOFOLLOW and refused
if anyone else could have written or read them; writes are atomic and durable (file and
directory fsynced). Their directory is /etc/luks, 0755 as install.sh makes it: the
files' own mode is what keeps the passphrase private.

A kill between write_atomically's create and rename leaves its temporary file
(`.name.<hex>.tmp`), which may hold a passphrase: the next run of the same operation
removes its own, decommission removes all, report lists them.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

from ..durable import leftover_temporaries, remove_durably, write_atomically
from ..errors import Refused, SetupConflict

STATE_DIR = Path("/etc/luks")

SETUP_PASSPHRASE = "setup-pending-passphrase"
SETUP_STATE = "setup-state.json"
ROTATION = "rotate-pending.json"  # passphrase and state in one file: a kill cannot leave one without the other
# Before issue 24 a rotation wrote its passphrase and its state as two files; read (to finish
# a rotation an upgrade interrupted), never written.
OLD_ROTATE_PASSPHRASE = "rotate-pending-passphrase"
OLD_ROTATE_STATE = "rotate-state.json"
# A re-encryption keeps no secret here, only the digest of the volume key it replaces: a re-run that
# finds a new digest knows cryptsetup had finished and only the header backup is left to write.
REENCRYPTION = "reencrypt-state.json"

FILES = {
    "setup": (SETUP_PASSPHRASE, SETUP_STATE),
    "rotate": (ROTATION, OLD_ROTATE_PASSPHRASE, OLD_ROTATE_STATE),
    "reencrypt": (REENCRYPTION,),
}
RERUN = {"setup": "run luksctl setup again", "rotate": "run luksctl rotate again", "reencrypt": "run luksctl reencrypt again"}
CONFLICT = {"setup": SetupConflict, "rotate": Refused, "reencrypt": Refused}  # each operation's exit code for "a person must look"


class PendingStore:
    """One operation's pending files ("setup" or "rotate") in `directory`."""

    def __init__(self, directory: Path, operation: str) -> None:
        self.directory = directory
        self.operation = operation
        self.names = FILES[operation]
        self.conflict = CONFLICT[operation]

    def path(self, name: str) -> Path:
        assert name in self.names, name
        return self.directory / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def read(self, name: str) -> bytes | None:
        """The file's content, or None if there is none; refused unless it is private to root."""
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symlink, which nobody but an attacker puts here
            raise self.conflict(f"{path} cannot be read safely: {exc.strerror}; move it away") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise self.conflict(f"{path} must be a file private to root (mode 0600); it is {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}")
            with os.fdopen(fd, "rb", closefd=False) as stream:
                return stream.read()
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Atomically and durably, 0600; first removes what an earlier killed write of ours left."""
        with contextlib.suppress(FileExistsError):  # /etc/luks, made as install.sh makes it: the ini beside us is the API's
            self.directory.mkdir(parents=True)
            self.directory.chmod(0o755)  # whatever root's umask
        self.remove_temporaries()
        write_atomically(self.path(name), data, mode=0o600)

    def remove(self, *names: str) -> None:
        """The files named, then any temporary a killed write of this operation left."""
        for name in names:
            remove_durably(self.path(name))
        self.remove_temporaries()

    def remove_temporaries(self) -> None:
        for name in self.names:
            for temporary in leftover_temporaries(self.directory / name):
                remove_durably(temporary)

    def leftovers(self) -> list[Path]:
        """Every file of this operation here: pending files and temporaries of killed writes."""
        return [path for name in self.names for path in (self.directory / name, *leftover_temporaries(self.directory / name)) if path.exists()]


def unfinished(directory: Path, *, other_than: str | None = None) -> dict[str, list[Path]]:
    """Each unfinished setup, rotation and re-encryption, with its files and the temporaries a
    kill left (for `report`, and for a command that must not start over another's unfinished work)."""
    found = {operation: PendingStore(directory, operation).leftovers() for operation in FILES if operation != other_than}
    return {operation: files for operation, files in found.items() if files}


def describe(unfinished: dict[str, list[Path]]) -> list[str]:
    return [f"{operation} ({', '.join(str(path) for path in files)}); {RERUN[operation]}" for operation, files in unfinished.items()]


def started(unfinished: dict[str, list[Path]]) -> dict[str, float]:
    """When each unfinished operation began, as far as its files tell: the oldest one's mtime."""
    return {operation: min(map(_mtime, files)) for operation, files in unfinished.items()}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # finished since it was listed
        return time.time()


def remove_all(directory: Path) -> list[str]:
    """decommission: every pending file and temporary of every operation; the paths removed."""
    removed = [path for files in unfinished(directory).values() for path in files]
    for path in removed:
        remove_durably(path)
    return [str(path) for path in removed]
