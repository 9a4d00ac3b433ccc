"""The API's bridge to `sudo -n luksctl`: the only way the web process gets root.

The passphrase goes on sudo's stdin, which sudo hands to luksctl; argv holds
only fixed words. The CLI answers with --json, and its exit code selects the
error raised here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Protocol

from .. import runner
from ..errors import ERROR_FOR_EXIT_CODE, EXIT_NOT_OPEN, EXIT_OK, CommandFailed, LuksctlError, PrivilegedCallFailed

log = logging.getLogger(__name__)

SUDO = "/usr/bin/sudo"


class PrivilegedBridge(Protocol):
    def open_volume(self, passphrase: str) -> dict: ...

    def nfs_mount(self) -> dict: ...


@dataclass(frozen=True)
class SudoBridge:
    luksctl: str
    timeout: float

    def open_volume(self, passphrase: str) -> dict:
        # One trailing newline, as the old callers piped it; luksctl strips exactly one.
        return self._call("open", passphrase.encode() + b"\n")

    def nfs_mount(self) -> dict:
        # Exit 1 means "some shares are still unmounted": the report says which.
        return self._call("nfs-mount", b"", ok_codes=(EXIT_OK, EXIT_NOT_OPEN))

    def _call(self, action: str, stdin: bytes, ok_codes: tuple[int, ...] = (EXIT_OK,)) -> dict:
        argv = [SUDO, "-n", self.luksctl, "--json", action]
        try:
            result = runner.run(argv, stdin=stdin, timeout=self.timeout, check=False)
        except CommandFailed as exc:
            log.error("%s", exc.detail())
            raise PrivilegedCallFailed(f"luksctl {action} did not complete: {exc.message}") from None
        try:
            report = json.loads(result.stdout)
            if not isinstance(report, dict):
                raise ValueError("not an object")
        except ValueError:
            log.error("luksctl %s gave no JSON report (exit %s): %s", action, result.returncode, result.stderr.strip())
            raise PrivilegedCallFailed(
                f"`sudo -n {self.luksctl} {action}` failed (exit {result.returncode}); "
                "check that the sudoers rule for this service user is installed"
            ) from None
        if result.returncode not in ok_codes:
            log.warning("luksctl %s exited %s: %s", action, result.returncode, result.stderr.strip())
            error_class = ERROR_FOR_EXIT_CODE.get(result.returncode, LuksctlError)
            raise error_class(str(report.get("error") or f"luksctl {action} failed with exit code {result.returncode}"))
        return report
