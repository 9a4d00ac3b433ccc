"""The unfinished setup: its passphrase and the steps done so far, on disk.

`setup` writes the passphrase here before anything can depend on it and
deletes it only after the volume is formatted, its passphrase is stored
(in Vault, or with the operator) and the volume is mounted. So there is no
moment at which a kill or a power loss leaves a volume whose passphrase is
nowhere. Both files are root's, mode 0600 (their directory, /etc/luks, is 0755 as install.sh
makes it: the files' own mode is what keeps the passphrase private).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..durable import remove_durably, write_atomically
from ..errors import SetupConflict

STATE_DIR = Path("/etc/luks")
PASSPHRASE_FILE = "setup-pending-passphrase"
STATE_FILE = "setup-state.json"

# The steps, in the order setup takes them. "*-started" marks work a kill may have left half done.
VAULT_WRITE_STARTED = "vault-write-started"
VAULT_WRITTEN = "vault-written"
FORMAT_STARTED = "format-started"
FORMATTED = "formatted"
HEADER_SAVED = "header-saved"
INI_WRITTEN = "ini-written"
WIPED = "wiped"
MKFS_STARTED = "mkfs-started"
MKFS_DONE = "mkfs-done"


class Journal:
    def __init__(self, directory: Path = STATE_DIR):
        self.directory = directory
        self.passphrase_path = directory / PASSPHRASE_FILE
        self.state_path = directory / STATE_FILE
        self.state: dict | None = None

    def load(self) -> dict | None:
        """The state of an unfinished setup, or None. Both files must be root's and private."""
        try:
            text = self._read_private(self.state_path).decode()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
            assert isinstance(state, dict) and isinstance(state.get("steps"), list)
        except (ValueError, AssertionError):
            raise SetupConflict(f"{self.state_path} is damaged; compare it with the device, then move it away") from None
        if not self.passphrase_path.exists():
            # begin() saves the passphrase before the state, finish() removes it first: so either
            # the setup had finished (all that is left is this file) or nothing has started.
            if MKFS_DONE in state["steps"] or not state["steps"]:
                remove_durably(self.state_path)
                return None
            raise SetupConflict(
                f"{self.state_path} records an unfinished setup ({', '.join(state['steps'])}) but "
                f"{self.passphrase_path} is gone; restore it from a backup before running setup again"
            )
        self.state = state
        return state

    def passphrase(self) -> bytes:
        return self._read_private(self.passphrase_path)

    def begin(self, passphrase: bytes, description: dict) -> None:
        """Save the passphrase first, then the state that says it is in use."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.passphrase_path, passphrase, mode=0o600)
        self.state = {**description, "steps": []}
        self._save()

    def done(self, step: str) -> bool:
        return self.state is not None and step in self.state["steps"]

    def record(self, step: str, **facts) -> None:
        assert self.state is not None
        self.state.update(facts)
        if step not in self.state["steps"]:
            self.state["steps"].append(step)
        self._save()

    def finish(self) -> None:
        """Everything is stored where it belongs: the passphrase copy goes, then the state."""
        remove_durably(self.passphrase_path)
        remove_durably(self.state_path)
        self.state = None

    def _save(self) -> None:
        write_atomically(self.state_path, json.dumps(self.state, indent=1).encode() + b"\n", mode=0o600)

    @staticmethod
    def _read_private(path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise SetupConflict(f"{path} must be private to root (mode 0600); it is {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}")
            with os.fdopen(fd, "rb", closefd=False) as stream:
                return stream.read()
        finally:
            os.close(fd)
