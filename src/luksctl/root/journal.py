"""The unfinished setup: its passphrase and the steps done so far, in the pending store.

`setup` writes the passphrase there before anything can depend on it and
deletes it only after the volume is formatted, its passphrase is stored
(in Vault, or with the operator) and the volume is mounted. So there is no
moment at which a kill or a power loss leaves a volume whose passphrase is
nowhere. pending.py keeps the files private to root and durable.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SetupConflict
from .pending import SETUP_PASSPHRASE as PASSPHRASE_FILE
from .pending import SETUP_STATE as STATE_FILE
from .pending import STATE_DIR, PendingStore

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
STEPS = (VAULT_WRITE_STARTED, VAULT_WRITTEN, FORMAT_STARTED, FORMATTED, HEADER_SAVED, INI_WRITTEN, WIPED, MKFS_STARTED, MKFS_DONE)


class Journal:
    def __init__(self, directory: Path = STATE_DIR):
        self.store = PendingStore(directory, "setup")
        self.passphrase_path = self.store.path(PASSPHRASE_FILE)
        self.state_path = self.store.path(STATE_FILE)
        self.state: dict | None = None

    def load(self) -> dict | None:
        """The state of an unfinished setup, or None. Both files must be root's and private."""
        text = self.store.read(STATE_FILE)
        if text is None:
            return None
        try:
            state = json.loads(text)
            assert isinstance(state, dict) and isinstance(state.get("steps"), list)
        except (ValueError, AssertionError):
            raise SetupConflict(f"{self.state_path} is damaged; compare it with the device, then move it away") from None
        if not self.store.exists(PASSPHRASE_FILE):
            # begin() saves the passphrase before the state, finish() removes it first: so either
            # the setup had finished (all that is left is this file) or nothing has started.
            if MKFS_DONE in state["steps"] or not state["steps"]:
                self.store.remove(STATE_FILE)
                return None
            raise SetupConflict(
                f"{self.state_path} records an unfinished setup ({', '.join(state['steps'])}) but "
                f"{self.passphrase_path} is gone; restore it from a backup before running setup again"
            )
        self.state = state
        return state

    def recorded_steps(self) -> list[str] | None:
        """The known steps an unfinished setup recorded, read only (load() may clean up or refuse);
        None when there is no readable state."""
        try:
            state = json.loads(self.store.read(STATE_FILE) or b"null")
        except (ValueError, SetupConflict):
            return None
        steps = state.get("steps") if isinstance(state, dict) else None
        return [step for step in steps if step in STEPS] if isinstance(steps, list) else None

    def passphrase(self) -> bytes:
        passphrase = self.store.read(PASSPHRASE_FILE)
        assert passphrase is not None, "load() found it"
        return passphrase

    def begin(self, passphrase: bytes, description: dict) -> None:
        """Save the passphrase first, then the state that says it is in use."""
        self.store.write(PASSPHRASE_FILE, passphrase)
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
        self.store.remove(PASSPHRASE_FILE, STATE_FILE)
        self.state = None

    def _save(self) -> None:
        self.store.write(STATE_FILE, json.dumps(self.state, indent=1).encode() + b"\n")
