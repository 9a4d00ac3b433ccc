"""Real LUKS headers on plain image files, described by an ini, and `luksctl` run on them.

cryptsetup formats, dumps, adds and kills keyslots and backs up headers on image files
without device-mapper, so the host tests run the real binary. Only the device path is
redirected from /dev/disk/by-uuid/<uuid> to the image; nothing is ever opened.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

from luksctl.config import VolumeConfig
from luksctl.root.cli import Paths, main

LUKS_LAB_PASSPHRASE = b"stored \\ passphrase \xc3\xbc 'quoted' $HOME"
LUKS_LAB_FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]  # tests only; production keeps argon2id
LUKS_LAB_FAST_NEW_SLOT = ["--pbkdf", "pbkdf2", "--iter-time", "1"]  # luksctl's options for new keyslots
WRONG_PASSPHRASE = 2  # cryptsetup(8) exit code: "no key available with this passphrase"
NO_KEYSLOT = b"No usable keyslot is available."  # exit 1: every keyslot killed or erased


class Lab:
    """One LUKS image described by an ini in a private directory."""

    def __init__(self, tmp_path: Path, monkeypatch, luks_type: str = "luks2", passphrase: bytes = LUKS_LAB_PASSPHRASE) -> None:
        self.dir = tmp_path
        self.image = tmp_path / "disk.img"
        self.uuid = self.format(self.image, passphrase, luks_type)
        self.backup = tmp_path / "luks-header.bck"
        self.ini = tmp_path / "luks-cryptdev.ini"
        self.ini.write_text(f"[luks]\nuuid = {self.uuid}\ncryptdev = labvol\nmountpoint = {self.dir / 'mnt'}\nheader_path = {self.backup}\n")
        self.paths = Paths(volume_ini=self.ini, api_config=tmp_path / "config.json", lock_file=tmp_path / "lock", root_owned=False)
        image = str(self.image)
        monkeypatch.setattr(VolumeConfig, "device_path", property(lambda self: image))

    @staticmethod
    def format(image: Path, passphrase: bytes, luks_type: str = "luks2", options: list[str] = LUKS_LAB_FAST) -> str:
        """A new 20 MiB image formatted with `options` (the keyslot's PBKDF, a cipher); its LUKS uuid."""
        with image.open("xb") as f:
            f.truncate(20 * 1024 * 1024)
        subprocess.run(["cryptsetup", "luksFormat", "--type", luks_type, *options, "--batch-mode", "--key-file=-", str(image)],
                       input=passphrase, check=True, capture_output=True)
        return subprocess.run(["cryptsetup", "luksUUID", str(image)], check=True, capture_output=True, text=True).stdout.strip()

    @staticmethod
    def opens(image: Path, passphrase: bytes) -> bool:
        """Whether `passphrase` opens a keyslot of `image` (a device or a header backup).

        Only cryptsetup's "no key available with this passphrase" (exit 2), or a header with no
        keyslot left at all, means no: any other failure (a missing or damaged file, a bad option)
        raises, so it never passes for a refusal.
        """
        result = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(image)],
                                input=passphrase, capture_output=True)
        no_keyslot = result.returncode == 1 and result.stderr.strip() == NO_KEYSLOT
        if result.returncode not in (0, WRONG_PASSPHRASE) and not no_keyslot:
            raise RuntimeError(f"cryptsetup could not test a passphrase on {image} (exit {result.returncode}): {result.stderr.decode()}")
        return result.returncode == 0

    def run(self, capsys, *argv: str, stdin: bytes = b"") -> tuple[int, dict]:
        """`luksctl --json ARGV` with `stdin`; its exit code and its one JSON line."""
        capsys.readouterr()
        code = main(["--json", *argv], paths=self.paths, stdin=io.BytesIO(stdin), stdin_is_tty=False)
        out = capsys.readouterr().out
        assert len(out.strip().splitlines()) == 1, out
        return code, json.loads(out)
