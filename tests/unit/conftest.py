"""Fakes for the two seams the unit tests isolate: starting processes and reading kernel state."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from luksctl import runner
from luksctl.config import VolumeConfig
from luksctl.errors import CommandFailed
from luksctl.root import cli, volume
from luksctl.status import VolumeStatus

UUID = "0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10"
CRYPTDEV = "xkqzbmwe"
DEVICE = f"/dev/disk/by-uuid/{UUID}"
MAPPER = f"/dev/mapper/{CRYPTDEV}"


@dataclass
class FakeHost:
    """Stands in for the kernel: commands that succeed change the state as the real ones would.

    `fail(...)` scripts a command (matched by argv prefix) to exit non-zero; a failed
    command changes nothing. Every call is recorded with its exact argv and stdin bytes.
    """

    mapper_open: bool = False
    mounted: bool = False
    calls: list[tuple[list[str], bytes | None]] = field(default_factory=list)
    failures: dict[tuple[str, ...], tuple[int, str]] = field(default_factory=dict)

    def fail(self, *argv_prefix: str, returncode: int, stderr: str = "") -> None:
        self.failures[argv_prefix] = (returncode, stderr)

    @property
    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]

    def stdin_of(self, *argv_prefix: str) -> bytes | None:
        (stdin,) = [stdin for argv, stdin in self.calls if tuple(argv[: len(argv_prefix)]) == argv_prefix]
        return stdin

    def status(self, _volume: VolumeConfig | None = None) -> VolumeStatus:
        return VolumeStatus("254:0" if self.mapper_open else None, self.mounted)

    def run(self, argv: list[str], *, timeout: float, stdin: bytes | None = None, check: bool = True) -> runner.Result:
        assert timeout > 0, "every command needs a timeout"
        self.calls.append((list(argv), stdin))
        for prefix, (returncode, stderr) in self.failures.items():
            if tuple(argv[: len(prefix)]) == prefix:
                break
        else:
            returncode, stderr = 0, ""
            self._apply(argv)
        if check and returncode != 0:
            raise CommandFailed(f"{argv[0]} failed with exit code {returncode}", list(argv), returncode, stderr)
        return runner.Result(list(argv), returncode, "", stderr)

    def _apply(self, argv: list[str]) -> None:
        if argv[:2] == ["cryptsetup", "open"] and "--test-passphrase" not in argv:
            self.mapper_open = True
        elif argv[:2] == ["cryptsetup", "close"]:
            self.mapper_open = False
        elif argv[0] == "mount" and "-a" not in argv:
            self.mounted = True
        elif argv[0] == "umount":
            self.mounted = False


@pytest.fixture
def host(monkeypatch) -> FakeHost:
    """A closed volume whose LUKS device is attached; runner.run and the status read are faked."""
    fake = FakeHost()
    monkeypatch.setattr(runner, "run", fake.run)
    monkeypatch.setattr(volume, "current_status", fake.status)
    monkeypatch.setattr(cli, "volume_status", lambda cryptdev, mountpoint: fake.status())  # status reads it without volume.py
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda path: path == DEVICE or real_exists(path))
    return fake


@pytest.fixture
def vol(tmp_path) -> VolumeConfig:
    return VolumeConfig(uuid=UUID, cryptdev=CRYPTDEV, mountpoint=str(tmp_path / "export"))


@pytest.fixture
def paths(tmp_path) -> cli.Paths:
    """The CLI's files in tmp_path: a volume ini naming CRYPTDEV, no API config, a lock file."""
    ini = tmp_path / "luks-cryptdev.ini"
    ini.write_text(
        f"[luks]\nuuid = {UUID}\ncryptdev = {CRYPTDEV}\n"
        f"mountpoint = {tmp_path / 'export'}\nfilesystem = ext4\n"
    )
    return cli.Paths(volume_ini=ini, api_config=tmp_path / "config.json", lock_file=tmp_path / "luksctl.lock", root_owned=False)
