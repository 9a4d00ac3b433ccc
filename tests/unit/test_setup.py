"""setup.py: the order of the steps, the exact argv and stdin of each command, and resuming.

The seams: runner.run (a fake disk that reacts like cryptsetup, blkid and mkfs), the sysfs
and /proc reads of blockdev/status, and the Vault client (luksctl.vault has its own real-OpenBao
tests). A kill is a BaseException raised by the fake at the step where the signal would land.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from luksctl import runner, status
from luksctl.errors import (
    CommandFailed,
    ConfigError,
    DeviceInUse,
    DeviceNotBlank,
    LuksctlError,
    NotBlockDevice,
    SecretExists,
    SetupConflict,
    VaultError,
    VaultUnreachable,
    VaultWriteDenied,
    WrappingTokenInvalid,
    WrongPassphrase,
)
from luksctl.vault import SecretRef
from luksctl.root import blockdev, header, journal, setup, volume
from luksctl.secret_input import read_token
from luksctl.status import Mount

DEVICE = "/dev/vdb"
UUID = "5a0c2f1e-8d7b-4c3a-9e6f-1b2d3c4e5f60"
REF = SecretRef("secrets", "sub/deploy-1/storage_encryption", "storage_encryption_key")
MAPPER = "/dev/mapper/crypt"
OTHER_DISK = {"dev": "254:16", "size": "2097152", "serial": "vol-ffffff"}  # attached later under the same name


class Killed(BaseException):
    """SIGKILL: nothing after it runs, no handler sees it."""


@dataclass
class Disk:
    """A block device and what cryptsetup, blkid, mkfs and mount do to it."""

    key: bytes | None = None  # set by luksFormat
    signature: str | None = None
    partition_table: str | None = None
    mapper_open: bool = False  # /dev/mapper/crypt, stacked on this disk
    filesystem: bool = False
    mounted: bool = False  # the mapper on /export
    busy: list[str] = field(default_factory=list)  # what blockdev.users finds besides stacked mappers
    foreign_mapper: str | None = None  # a mapper of that name open on another disk
    foreign_mounts: list[str] = field(default_factory=list)  # other filesystems' mountpoints
    identity: dict = field(default_factory=lambda: {"dev": "254:16", "size": "2097152", "serial": "vol-0a1b2c"})
    calls: list[tuple[list[str], bytes | None]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    kill_at: tuple[str, ...] | None = None  # argv prefix whose start kills setup

    def run(self, argv, *, timeout, stdin=None, check=True):
        assert timeout > 0
        if self.kill_at and tuple(argv[: len(self.kill_at)]) == self.kill_at:
            self.kill_at = None
            raise Killed()
        self.calls.append((list(argv), stdin))
        self.events.append(" ".join(argv[:2]))
        code, out = 0, ""
        match argv[:2]:
            case ["blkid", "-p"]:
                found = [f"{key}={value}\n" for key, value in (("TYPE", self.signature), ("PTTYPE", self.partition_table)) if value]
                code, out = (0, "".join(found)) if found else (2, "")
            case ["cryptsetup", "isLuks"]:
                code = 0 if self.key is not None else 1
            case ["cryptsetup", "luksFormat"]:
                self.key, self.signature = stdin, "crypto_LUKS"
            case ["cryptsetup", "open"] if argv[2] == "--test-passphrase":
                code = 0 if stdin == self.key else 2
            case ["cryptsetup", "open"]:
                assert stdin == self.key
                self.mapper_open = True
            case ["cryptsetup", "luksUUID"]:
                out = UUID + "\n"
            case ["cryptsetup", "luksHeaderBackup"]:
                Path(argv[-1]).write_bytes(b"LUKS header of " + UUID.encode())
            case ["mkfs.ext4", _]:
                self.filesystem = True
            case ["wipefs", "--all"]:
                self.filesystem = False
        if check and code:
            raise CommandFailed(f"{argv[0]} failed", list(argv), code, "")
        return runner.Result(list(argv), code, out, "")

    def argv_of(self, *prefix):
        return [argv for argv, _ in self.calls if tuple(argv[: len(prefix)]) == prefix]

    def stdin_of(self, *prefix):
        (stdin,) = [stdin for argv, stdin in self.calls if tuple(argv[: len(prefix)]) == prefix]
        return stdin


class FakeVault:
    """The Vault as seen through keystore: one secret store, tokens with capabilities."""

    def __init__(self, disk: Disk):
        self.disk = disk
        self.secrets: dict[str, str] = {}
        self.capabilities = {"create"}
        self.lookup_denied = False  # a policy without `default`: the token may not look its capabilities up
        self.readable = False
        self.version = 1  # of the secret a write makes
        self.down = False
        self.cut_write = False  # the connection drops before the write reaches Vault
        self.lose_answer = False  # the write lands, the answer does not come back
        self.unwrapped: list[str] = []
        self.revoked = 0

    def unwrap(self, url, token, *, ca_bundle=None, timeout=10):
        if self.down:
            raise VaultUnreachable("Vault at url cannot be reached (unwrap)")
        if token in self.unwrapped:
            raise WrappingTokenInvalid("used")
        self.unwrapped.append(token)
        return _Client(self)


class _Client:
    def __init__(self, vault: FakeVault):
        self.vault = vault

    def capabilities(self, ref):
        from luksctl.errors import VaultDenied

        if self.vault.lookup_denied:
            raise VaultDenied("may not look up")
        return set(self.vault.capabilities)

    def write(self, ref, value, *, cas):
        vault = self.vault
        vault.disk.events.append("vault write")
        if vault.down or vault.cut_write:
            vault.cut_write = False
            raise VaultUnreachable("down")
        if str(ref) in vault.secrets:
            if ref.kv_version == 1 and "update" in vault.capabilities:
                vault.secrets[str(ref)] = value  # KV v1: no check-and-set, the write replaces
                return None
            if "update" in vault.capabilities:
                raise SecretExists("exists")
            raise VaultWriteDenied("denied")
        if not vault.capabilities & {"create", "update"}:
            raise VaultWriteDenied("denied")
        vault.secrets[str(ref)] = value
        if vault.lose_answer:
            vault.lose_answer = False
            raise VaultUnreachable("the answer was lost")
        return vault.version

    def read(self, ref):
        from luksctl.errors import SecretNotFound

        if str(ref) not in self.vault.secrets:
            raise SecretNotFound("none")
        return self.vault.secrets[str(ref)]

    def holds(self, ref, value):
        from luksctl.errors import VaultDenied

        if not self.vault.readable:
            raise VaultDenied("may not read")
        return self.vault.secrets.get(str(ref)) == value

    def revoke_self(self):
        self.vault.revoked += 1


@pytest.fixture
def disk(monkeypatch, tmp_path) -> Disk:
    fake = Disk()
    monkeypatch.setattr(runner, "run", fake.run)
    monkeypatch.setattr(blockdev, "block_device", lambda path: blockdev.BlockDevice(path, "254:16"))
    monkeypatch.setattr(blockdev, "identity", lambda device: dict(fake.identity) if device.path == DEVICE else pytest.fail(f"identity of {device}"))

    def holders(device):
        assert device.path == DEVICE, device
        return {"dm-0": "crypt"} if fake.mapper_open else {}

    def users(device, allowed_holder=None):  # as blockdev.users: a stacked mapper counts unless allowed
        return [*fake.busy, *(f"{dm_name} ({sysfs_name}) is stacked on it (close it first)"
                             for sysfs_name, dm_name in holders(device).items() if dm_name != allowed_holder)]

    def find_mapper_device(name, *_sysfs):
        return "253:0" if fake.mapper_open and name == "crypt" else "253:7" if name == fake.foreign_mapper else None

    def read_mounts(*_mountinfo):
        ours = [Mount("253:0", "/export", "ext4", MAPPER)] if fake.mounted else []
        return [Mount("254:1", "/", "ext4", "/dev/vda1"), *ours, *(Mount("0:52", path, "nfs", "nfs:/x") for path in fake.foreign_mounts)]

    monkeypatch.setattr(blockdev, "users", users)
    monkeypatch.setattr(blockdev, "holders", holders)
    # status.volume_status (setup's and volume's) runs for real on these two:
    for module in (setup, status):
        monkeypatch.setattr(module, "find_mapper_device", find_mapper_device)
        monkeypatch.setattr(module, "read_mounts", read_mounts)

    def mount(described, options):
        fake.events.append(f"mount {described.mapper_path} -o {options}")
        fake.mounted = True

    monkeypatch.setattr(volume, "mount", mount)
    monkeypatch.setattr(setup, "ENCRYPTION_SUCCESS", (tmp_path / "run" / "fast-luks-encryption.success", "LUKS encryption completed."))
    monkeypatch.setattr(setup, "VOLUME_SUCCESS", (tmp_path / "run" / "fast-luks-volume-setup.success", "Volume setup completed."))
    (tmp_path / "run").mkdir()
    return fake


@pytest.fixture
def vault(disk, monkeypatch) -> FakeVault:
    fake = FakeVault(disk)
    monkeypatch.setattr(setup.VaultClient, "unwrap", lambda client, token: fake.unwrap(client.url, token))
    return fake


@pytest.fixture
def zeroing(disk, monkeypatch) -> list[str]:
    """blockdev.zero_device, which a fake disk has no mapper for: the paths zeroed; each reports 50% then 100%."""
    zeroed = []

    def zero_device(path, report):
        zeroed.append(path)
        for done in (1, 2):
            report(done, 2)
        return 2

    monkeypatch.setattr(blockdev, "zero_device", zero_device)
    return zeroed


def make_options(tmp_path, *, token: str | None = "wrapping-1", **overrides) -> setup.SetupOptions:
    target = setup.VaultTarget("https://vault.example:8200", REF, token=token) if token != "none" else None
    base = setup.SetupOptions(
        device=DEVICE, mountpoint="/export", vault=target,
        ini_path=tmp_path / "luks" / "luks-cryptdev.ini", header_path=tmp_path / "luks" / "luks-header.bck",
        state_dir=tmp_path / "luks",
    )
    return replace(base, **overrides)


def run(options, **kwargs) -> setup.SetupReport:
    return setup.run_setup(options, setup.Progress(json_lines=False, err=io.StringIO(), tty=False), **kwargs)


def pending(tmp_path) -> Path:
    return tmp_path / "luks" / journal.PASSPHRASE_FILE


def test_fresh_setup_runs_every_command_in_order_with_the_passphrase_only_on_stdin(tmp_path, disk, vault):
    report = run(make_options(tmp_path))

    passphrase = disk.key
    assert len(passphrase) == 64 and passphrase.isalnum()
    assert vault.secrets == {str(REF): passphrase.decode()}
    assert disk.events == [
        "blkid -p", "vault write", "blkid -p",  # still blank after the Vault exchange
        "cryptsetup luksFormat", "cryptsetup open", "cryptsetup luksUUID",
        "cryptsetup luksHeaderBackup", "cryptsetup open", "mkfs.ext4 /dev/mapper/crypt", "mount /dev/mapper/crypt -o nosuid,nodev",
    ]
    assert disk.argv_of("cryptsetup", "luksFormat") == [[
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
        "--key-size", "512", "--hash", "sha256", "--pbkdf", "argon2id", "--key-file=-", DEVICE,
    ]]
    assert disk.stdin_of("cryptsetup", "luksFormat") == passphrase
    assert disk.argv_of("cryptsetup", "open") == [
        ["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-file=-", DEVICE],
        ["cryptsetup", "open", DEVICE, "crypt", "--key-file=-"],
    ]
    assert disk.argv_of("blkid") == [["blkid", "-p", "-o", "export", DEVICE]] * 2
    assert disk.argv_of("mkfs.ext4") == [["mkfs.ext4", MAPPER]]
    assert disk.argv_of("cryptsetup", "luksUUID") == [["cryptsetup", "luksUUID", DEVICE]]
    assert all(passphrase.decode() not in arg for argv, _ in disk.calls for arg in argv)
    assert (report.volume_state, report.uuid, report.changed, report.resumed) == ("mounted", UUID, True, False)
    assert vault.revoked == 1


def test_fresh_setup_writes_the_ini_header_and_success_files_then_forgets_the_passphrase(tmp_path, disk, vault):
    options = make_options(tmp_path)
    run(options)

    assert options.ini_path.read_text() == (
        "[luks]\ncipher_algorithm = aes-xts-plain64\nhash_algorithm = sha256\nkeysize = 512\n"
        f"device = {DEVICE}\nuuid = {UUID}\ncryptdev = crypt\nmapper = {MAPPER}\nmountpoint = /export\n"
        f"filesystem = ext4\nheader_path = {options.header_path}\n\n"
    )
    assert stat.S_IMODE(options.ini_path.stat().st_mode) == 0o644  # README's file table; 0600 only with a passphrase in it
    assert stat.S_IMODE(options.header_path.stat().st_mode) == 0o600
    # Its checksum beside it, as `luksctl header backup` records it: `header verify` can tell it intact.
    sidecar = tmp_path / "luks" / "luks-header.bck.sha256"
    assert sidecar.read_text() == f"{header.sha256_of(options.header_path)}  luks-header.bck\n"
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    for (path, _), text in ((setup.ENCRYPTION_SUCCESS, "LUKS encryption completed."), (setup.VOLUME_SUCCESS, "Volume setup completed.")):
        assert (path.read_text(), stat.S_IMODE(path.stat().st_mode)) == (text, 0o644)
    assert not pending(tmp_path).exists() and not (tmp_path / "luks" / journal.STATE_FILE).exists()


def test_the_passphrase_is_saved_privately_before_vault_or_the_device_sees_it(tmp_path, disk, vault, monkeypatch):
    seen = []

    def write(ref, value, *, cas):
        path = pending(tmp_path)
        seen.append((path.read_bytes().decode(), stat.S_IMODE(path.stat().st_mode), cas, disk.key))
        return 1

    monkeypatch.setattr(_Client, "write", lambda self, ref, value, *, cas: write(ref, value, cas=cas))
    run(make_options(tmp_path))

    assert seen == [(disk.key.decode(), 0o600, 0, None)]  # saved, private, create-only, device not yet formatted


def test_operator_passphrase_and_fastluks_defaults(tmp_path, disk, vault):
    from luksctl.root import fastluks

    args = fastluks.build_parser().parse_args([
        "--device", DEVICE, "--cryptdev", "crypt", "-m", "/export", "--vault", "--vault-url", "https://v:8200",
        "--wrapping-token", "hvs.argv-token", "--secret-path", "sub/deploy-1/storage_encryption", "--user-key", "storage_encryption_key",
        "--cryptdev-file", str(tmp_path / "luks" / "luks-cryptdev.ini"), "--header-backup-file", str(tmp_path / "luks" / "luks-header.bck"),
        "-p", "Own-Pass-phrase",
    ])
    options = replace(fastluks.options_from_args(args, io.BytesIO()), state_dir=tmp_path / "luks")
    assert "argv-token" not in repr(options) and "Own-Pass" not in repr(options)
    run(options)

    assert disk.argv_of("cryptsetup", "luksFormat") == [[
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
        "--key-size", "256", "--hash", "sha256", "--iter-time", "2000", "--key-file=-", DEVICE,
    ]]
    assert disk.key == b"Own-Pass-phrase" and vault.secrets == {str(REF): "Own-Pass-phrase"}
    assert vault.unwrapped == ["hvs.argv-token"]


def test_save_passphrase_locally_puts_it_in_a_private_ini(tmp_path, disk, vault):
    options = make_options(tmp_path, save_passphrase_locally=True)
    run(options)

    assert f"passphrase = {disk.key.decode()}" in options.ini_path.read_text()
    assert stat.S_IMODE(options.ini_path.stat().st_mode) == 0o600


# --- refusals: nothing changes --------------------------------------------------------------


@pytest.mark.parametrize("found, error, message", [
    ({"signature": "ext4", "partition_table": "gpt"}, DeviceNotBlank,
     f"{DEVICE} is not blank (signature ext4, partition table gpt); setup changed nothing. If its content may be destroyed, run again with --force"),
    # A mapper called crypt on it counts too: only a resumed setup may find its own there.
    ({"busy": [f"{DEVICE} is mounted on /mnt"], "mapper_open": True}, DeviceInUse,
     f"{DEVICE} is in use: {DEVICE} is mounted on /mnt; crypt (dm-0) is stacked on it (close it first). setup changed nothing"),
    ({"foreign_mapper": "crypt"}, SetupConflict, "the mapper name crypt is already used by another device; choose another --cryptdev"),
    ({"foreign_mounts": ["/export"]}, SetupConflict, "something else is mounted on /export; setup never unmounts what it did not mount"),
])
def test_a_device_that_is_not_free_is_refused_and_nothing_changes(tmp_path, disk, vault, found, error, message):
    for name, value in found.items():
        setattr(disk, name, value)
    with pytest.raises(error) as refused:
        run(make_options(tmp_path))

    assert str(refused.value) == message
    assert disk.argv_of("cryptsetup") == [] and vault.unwrapped == [] and not (tmp_path / "luks").exists()


def test_force_overrides_the_signature_check_only(tmp_path, disk, vault, monkeypatch):
    disk.signature = "ext4"
    run(make_options(tmp_path, force=True))
    assert disk.key is not None

    monkeypatch.setattr(blockdev, "users", lambda device, allowed_holder=None: ["/dev/vdb is mounted on /mnt"])
    with pytest.raises(DeviceInUse, match="mounted on /mnt"):
        run(make_options(tmp_path, force=True, device="/dev/vdc"))


def test_not_a_block_device_is_refused(tmp_path):
    regular = tmp_path / "file"
    regular.write_bytes(b"x" * 4096)
    with pytest.raises(NotBlockDevice, match="not a block device"):
        run(make_options(tmp_path, device=str(regular)))
    assert regular.read_bytes() == b"x" * 4096


@pytest.mark.parametrize("option, what", [("header_path", "header backup"), ("ini_path", "volume description")])
def test_existing_header_backup_or_ini_is_never_overwritten(tmp_path, disk, vault, option, what):
    options = make_options(tmp_path)
    path = getattr(options, option)
    path.parent.mkdir()
    path.write_bytes(b"someone's")

    with pytest.raises(SetupConflict) as refused:
        run(options)
    assert str(refused.value) == f"a {what} already exists at {path}; setup never overwrites it. Move it away first"
    assert path.read_bytes() == b"someone's" and disk.key is None


@pytest.mark.parametrize("capabilities, listed", [({"read", "list"}, "list, read"), (set(), "none")])
def test_token_that_may_not_create_is_refused_before_the_device_is_touched(tmp_path, disk, vault, capabilities, listed):
    vault.capabilities = capabilities
    with pytest.raises(VaultWriteDenied) as refused:
        run(make_options(tmp_path))

    assert str(refused.value) == f"the token may not write {REF} (its capabilities there: {listed}); setup changed nothing on the device"
    assert disk.key is None and vault.secrets == {}
    assert not pending(tmp_path).exists()  # stored nowhere and used nowhere: nothing to keep


def test_path_that_holds_a_secret_is_refused_before_the_device_is_touched(tmp_path, disk, vault):
    vault.secrets[str(REF)] = "someone else's"
    with pytest.raises(VaultWriteDenied):
        run(make_options(tmp_path))

    assert disk.key is None and vault.secrets[str(REF)] == "someone else's" and not pending(tmp_path).exists()


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path, disk, vault):
    report = run(make_options(tmp_path, dry_run=True, wipe=True))

    assert disk.events == ["blkid -p"] and vault.unwrapped == [] and not (tmp_path / "luks").exists()
    assert (report.volume_state, report.device, report.uuid, report.changed) == ("unavailable", DEVICE, None, False)
    luks = tmp_path / "luks"
    assert report.plan == [
        f"save the passphrase to {luks / journal.PASSPHRASE_FILE} (root, 0600) until the end",
        f"store the passphrase at {REF} on https://vault.example:8200 (create only)",
        f"format {DEVICE}: luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 --key-size 512 --hash sha256 "
        f"--pbkdf argon2id --key-file=- {DEVICE}",
        f"back up the LUKS header to {luks / 'luks-header.bck'} (0600)",
        f"describe the volume in {luks / 'luks-cryptdev.ini'}",
        "open it as /dev/mapper/crypt",
        "zero /dev/mapper/crypt",
        "make a ext4 filesystem",
        "mount it on /export",
        f"write {setup.ENCRYPTION_SUCCESS[0]} and {setup.VOLUME_SUCCESS[0]}",
        "delete the saved passphrase",
    ]


def test_dry_run_without_vault_or_wipe_plans_neither(tmp_path, disk):
    options = make_options(tmp_path, token="none", passphrase=b"the operator's own", dry_run=True)
    report = run(options)

    with_both = setup.plan(replace(options, vault=make_options(tmp_path).vault, wipe=True), [])
    assert report.plan == [step for step in with_both if not step.startswith(("store the passphrase at", "zero "))]
    assert len(report.plan) == 9


def test_dry_run_of_an_unfinished_setup_says_what_is_done(tmp_path, disk, vault):
    disk.kill_at = ("cryptsetup", "luksFormat")
    with pytest.raises(Killed):
        run(make_options(tmp_path))

    report = run(make_options(tmp_path, token="wrapping-2", dry_run=True))

    assert report.plan[0] == "resume the unfinished setup (done: vault-write-started, vault-written, format-started)"
    assert report.plan[1:] == setup.plan(make_options(tmp_path), [])


# --- crash safety: a kill anywhere, then the same command again ---------------------------


@pytest.mark.parametrize("fault", ["down", "cut_write"])  # at the unwrap; on the write's way to Vault
def test_vault_failure_keeps_the_passphrase_and_a_rerun_with_a_new_token_finishes(tmp_path, disk, vault, fault):
    setattr(vault, fault, True)
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))
    assert disk.key is None and pending(tmp_path).exists()
    saved = pending(tmp_path).read_bytes()

    vault.down = False
    report = run(make_options(tmp_path, token="wrapping-2"))

    assert report.resumed and disk.key == saved and vault.secrets[str(REF)] == saved.decode()


# The next token: create-only (Vault refuses the create), or one that may not write there at all.
@pytest.mark.parametrize("capabilities", [{"create"}, {"deny"}])
def test_lost_write_answer_with_a_token_that_may_not_read_is_refused_then_a_read_token_confirms(tmp_path, disk, vault, capabilities):
    vault.lose_answer = True
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))
    saved = pending(tmp_path).read_bytes()
    vault.capabilities = capabilities

    with pytest.raises(SetupConflict) as refused:
        run(make_options(tmp_path, token="wrapping-2"))  # it cannot tell whose secret it is
    assert str(refused.value) == (
        f"an earlier run was interrupted while writing the passphrase to {REF}, and the path now holds a secret "
        "that this token may not read. If the earlier write landed, it is ours. Run the same command again with a token "
        "that may read the path (e.g. the dashboard's read-only wrapping token) to check. The passphrase stays in "
        f"{pending(tmp_path)}; the device is untouched")
    assert pending(tmp_path).read_bytes() == saved and disk.key is None

    vault.capabilities, vault.readable = {"read"}, True  # the dashboard's read-only token
    report = run(make_options(tmp_path, token="wrapping-3"))
    assert report.resumed and disk.key == saved


def test_interrupted_write_then_someone_elses_secret_is_refused_and_forgotten(tmp_path, disk, vault):
    vault.cut_write = True
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))
    vault.readable = True
    vault.secrets[str(REF)] = "someone else's"

    with pytest.raises(SecretExists, match="another secret"):
        run(make_options(tmp_path, token="wrapping-2"))
    assert disk.key is None and not pending(tmp_path).exists()


def test_kill_right_after_luks_format_resumes_without_formatting_again(tmp_path, disk, vault):
    disk.kill_at = ("cryptsetup", "open", "--test-passphrase")
    with pytest.raises(Killed):
        run(make_options(tmp_path))
    key = disk.key
    assert key == pending(tmp_path).read_bytes()
    disk.calls.clear()

    report = run(make_options(tmp_path, token=None))  # Vault has it: no token needed any more

    assert disk.argv_of("cryptsetup", "luksFormat") == [] and disk.key == key
    # What tells the format finished: this device is LUKS and the journal's passphrase opens it.
    assert disk.argv_of("cryptsetup", "isLuks") + disk.argv_of("cryptsetup", "open", "--test-passphrase") == [
        ["cryptsetup", "isLuks", DEVICE], ["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-file=-", DEVICE]]
    assert disk.stdin_of("cryptsetup", "open", "--test-passphrase") == key
    assert report.resumed and report.volume_state == "mounted" and vault.unwrapped == ["wrapping-1"]


# Killed before cryptsetup wrote a usable header: before it wrote anything, or after the LUKS
# magic (blkid sees crypto_LUKS) but before a keyslot. Not blank then, and still formatted again.
@pytest.mark.parametrize("signature_left", [None, "crypto_LUKS"])
def test_kill_during_luks_format_formats_again(tmp_path, disk, vault, signature_left):
    disk.kill_at = ("cryptsetup", "luksFormat")
    with pytest.raises(Killed):
        run(make_options(tmp_path))
    assert journal.FORMAT_STARTED in json.loads((tmp_path / "luks" / journal.STATE_FILE).read_text())["steps"]
    disk.signature = signature_left

    run(make_options(tmp_path, token=None))

    assert len(disk.argv_of("cryptsetup", "luksFormat")) == 1 and disk.key == vault.secrets[str(REF)].encode()


def test_kill_during_luks_format_of_a_device_with_an_old_luks_header_formats_again(tmp_path, disk, vault):
    """The old header is LUKS but not ours: only the pending passphrase opening it says luksFormat finished."""
    disk.key, disk.signature = b"the previous owner's passphrase", "crypto_LUKS"
    disk.kill_at = ("cryptsetup", "luksFormat")
    with pytest.raises(Killed):
        run(make_options(tmp_path, force=True))

    run(make_options(tmp_path, token=None, force=True))

    assert len(disk.argv_of("cryptsetup", "luksFormat")) == 1 and disk.key == vault.secrets[str(REF)].encode()


def test_a_new_header_that_refuses_the_passphrase_stops_setup_before_the_backup(tmp_path, disk, vault, monkeypatch):
    def format_sets_another_key(argv, **kwargs):
        result = disk.run(argv, **kwargs)
        if argv[:2] == ["cryptsetup", "luksFormat"]:
            disk.key = b"not the passphrase given"
        return result

    monkeypatch.setattr(runner, "run", format_sets_another_key)
    with pytest.raises(WrongPassphrase) as refused:
        run(make_options(tmp_path))
    assert str(refused.value) == f"the new LUKS header on {DEVICE} does not accept the passphrase just set"
    assert disk.argv_of("cryptsetup", "luksHeaderBackup") == [] and pending(tmp_path).exists()


def test_a_resumed_setup_refuses_another_passphrase_than_the_one_it_began_with(tmp_path, disk, vault):
    vault.down = True
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path, passphrase=b"the first one"))
    vault.down = False

    with pytest.raises(SetupConflict) as refused:
        run(make_options(tmp_path, token="wrapping-2", passphrase=b"another one"))
    assert str(refused.value) == f"the unfinished setup uses the passphrase saved in {pending(tmp_path)}, not the one given now"

    report = run(make_options(tmp_path, token="wrapping-3", passphrase=b"the first one"))
    assert report.resumed and disk.key == b"the first one"


def test_a_setup_that_has_yet_to_write_to_vault_needs_a_token(tmp_path, disk, vault):
    vault.down = True
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))

    with pytest.raises(LuksctlError) as refused:
        run(make_options(tmp_path, token=None))
    assert str(refused.value) == "a Vault token is needed to store the passphrase: --wrapping-token-file FILE or --token-file FILE ('-' for stdin)"
    assert disk.key is None and pending(tmp_path).exists()


def test_a_resumed_setup_refuses_another_disk_attached_under_the_same_name(tmp_path, disk, vault):
    vault.down = True  # the first run stops at the Vault step; the journal records the disk
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))
    vault.down = False
    disk.identity = dict(OTHER_DISK)  # same path, same major:minor, same size: another disk

    with pytest.raises(SetupConflict, match="not the disk the unfinished setup"):
        run(make_options(tmp_path, token="wrapping-2"))
    assert disk.argv_of("cryptsetup", "luksFormat") == [] and vault.secrets == {}


def test_a_setup_resumed_after_its_format_refuses_another_disk_too(tmp_path, disk, vault):
    disk.kill_at = ("cryptsetup", "luksHeaderBackup")
    with pytest.raises(Killed):
        run(make_options(tmp_path))
    disk.identity["size"] = "4194304"
    disk.calls.clear()

    with pytest.raises(SetupConflict, match="not the disk the unfinished setup"):
        run(make_options(tmp_path, token=None))
    assert disk.calls == []


def test_a_resumed_setup_refuses_a_device_no_longer_blank(tmp_path, disk, vault):
    """The journal skipped the blank check on resume: a device written to since was formatted."""
    vault.down = True
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))
    vault.down = False
    disk.signature = "ext4"

    with pytest.raises(DeviceNotBlank):
        run(make_options(tmp_path, token="wrapping-2"))
    assert disk.argv_of("cryptsetup", "luksFormat") == []


@pytest.mark.parametrize("meanwhile, error, message", [
    ({"signature": "xfs", "partition_table": "dos"}, DeviceNotBlank,
     f"{DEVICE} is not blank (signature xfs, partition table dos); it was not formatted, and the passphrase stays in <passphrase>. "
     "If its content may be destroyed, run again with --force"),
    ({"busy": [f"{DEVICE} is mounted on /mnt", f"{DEVICE} is in use as swap"]}, DeviceInUse,
     f"{DEVICE} is in use: {DEVICE} is mounted on /mnt; {DEVICE} is in use as swap. It was not formatted"),
    ({"identity": OTHER_DISK}, SetupConflict,
     f"{DEVICE} is not the disk the unfinished setup in <journal> began on (it recorded {Disk().identity}, this one is {OTHER_DISK}); "
     "attach that disk, or move the journal away"),
])
def test_a_device_changed_during_the_vault_exchange_is_not_formatted(tmp_path, disk, vault, monkeypatch, meanwhile, error, message):
    """The path is resolved and checked again just before luksFormat: the Vault exchange took time."""
    write = _Client.write

    def the_device_changes_meanwhile(client, ref, value, *, cas):
        for name, changed in meanwhile.items():
            setattr(disk, name, changed)
        return write(client, ref, value, cas=cas)

    monkeypatch.setattr(_Client, "write", the_device_changes_meanwhile)
    with pytest.raises(error) as refused:
        run(make_options(tmp_path))
    assert str(refused.value) == message.replace("<journal>", str(tmp_path / "luks" / journal.STATE_FILE)).replace("<passphrase>", str(pending(tmp_path)))
    assert disk.argv_of("cryptsetup", "luksFormat") == []


def test_kill_right_after_the_header_backup_keeps_it_and_records_its_checksum(tmp_path, disk, vault, monkeypatch):
    real_record = journal.Journal.record

    def killed_before_recording(self, step, **extra):
        if step == journal.HEADER_SAVED:
            raise Killed()
        real_record(self, step, **extra)

    monkeypatch.setattr(journal.Journal, "record", killed_before_recording)
    with pytest.raises(Killed):
        run(make_options(tmp_path))
    monkeypatch.setattr(journal.Journal, "record", real_record)
    saved = (tmp_path / "luks" / "luks-header.bck").read_bytes()

    run(make_options(tmp_path, token=None))  # the backup there is ours (identical): kept, no refusal

    assert (tmp_path / "luks" / "luks-header.bck").read_bytes() == saved
    assert header.recorded_checksum(tmp_path / "luks" / "luks-header.bck") == header.sha256_of(tmp_path / "luks" / "luks-header.bck")


def test_a_different_header_backup_appearing_mid_run_is_left_alone(tmp_path, disk, vault, monkeypatch):
    options = make_options(tmp_path)

    def someone_writes_a_backup(argv, **kwargs):
        if argv[:2] == ["cryptsetup", "luksHeaderBackup"]:
            options.header_path.write_bytes(b"someone's header")
        return disk.run(argv, **kwargs)

    monkeypatch.setattr(runner, "run", someone_writes_a_backup)
    with pytest.raises(SetupConflict, match="different header backup appeared"):
        run(options)
    assert options.header_path.read_bytes() == b"someone's header"
    assert not list(options.header_path.parent.glob(".*.tmp")) and not list(options.header_path.parent.glob(".luksctl-*"))


def test_kill_during_mkfs_wipes_the_partial_filesystem_and_makes_it_again(tmp_path, disk, vault):
    disk.kill_at = ("mkfs.ext4",)
    with pytest.raises(Killed):
        run(make_options(tmp_path))
    disk.events.clear()

    run(make_options(tmp_path, token=None))

    assert disk.events == ["wipefs --all", "mkfs.ext4 /dev/mapper/crypt", "mount /dev/mapper/crypt -o nosuid,nodev"]
    assert disk.argv_of("wipefs") == [["wipefs", "--all", MAPPER]]


@pytest.mark.parametrize("mounted, state, rebooted", [(True, "mounted", False), (False, "unmounted", False), (False, "unmounted", True)])
def test_a_finished_setup_run_again_changes_nothing(tmp_path, disk, vault, mounted, state, rebooted):
    run(make_options(tmp_path))
    disk.calls.clear()
    disk.events.clear()
    disk.mounted = mounted  # unmounted since: reported so, not mounted again
    if rebooted:  # /var/run is a tmpfs: the success files are gone
        disk.mapper_open = False
        for path, _ in (setup.ENCRYPTION_SUCCESS, setup.VOLUME_SUCCESS):
            path.unlink()

    report = run(make_options(tmp_path, token="wrapping-2"))

    assert report == setup.SetupReport(state, DEVICE, UUID, changed=False)
    assert vault.unwrapped == ["wrapping-1"] and disk.events == ["cryptsetup isLuks", "cryptsetup luksUUID"]
    assert [argv for argv, _ in disk.calls] == [["cryptsetup", "isLuks", DEVICE], ["cryptsetup", "luksUUID", DEVICE]]


def test_a_finished_setup_whose_ini_names_another_luks_uuid_is_not_taken_as_done(tmp_path, disk, vault):
    """The device was closed and formatted again since: the ini describes a volume that is gone."""
    options = make_options(tmp_path)
    run(options)
    disk.mounted = disk.mapper_open = False
    options.ini_path.write_text(options.ini_path.read_text().replace(UUID, "00000000-0000-4000-8000-000000000001"))

    with pytest.raises(DeviceNotBlank):
        run(make_options(tmp_path, token="wrapping-2"))
    assert vault.unwrapped == ["wrapping-1"]


def test_resume_with_other_settings_is_refused_naming_what_was_recorded(tmp_path, disk, vault):
    vault.down = True
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))
    elsewhere = replace(make_options(tmp_path).vault, ref=SecretRef("secrets", "sub/deploy-2/storage_encryption", "storage_encryption_key"))

    with pytest.raises(SetupConflict) as refused:
        run(make_options(tmp_path, cryptdev="other", vault=elsewhere))
    assert str(refused.value) == (
        f"an unfinished setup is recorded in {tmp_path / 'luks' / journal.STATE_FILE} with other settings "
        f"(cryptdev='crypt', vault={str(REF)!r}); run that same command again to finish it")


@pytest.mark.parametrize("token, recorded_vault, steps", [
    ("wrapping-1", str(REF), [journal.VAULT_WRITE_STARTED, journal.VAULT_WRITTEN, journal.FORMAT_STARTED]),
    ("none", None, [journal.FORMAT_STARTED]),
])
def test_the_journal_records_what_the_setup_began_with(tmp_path, disk, vault, token, recorded_vault, steps):
    """A re-run compares itself with these, and a later version reads them: the keys are a file format."""
    disk.kill_at = ("cryptsetup", "luksFormat")
    with pytest.raises(Killed):
        run(make_options(tmp_path, token=token, passphrase=b"the operator's own"))

    assert json.loads((tmp_path / "luks" / journal.STATE_FILE).read_text()) == {
        "device": DEVICE, "dev": "254:16", "identity": disk.identity, "cryptdev": "crypt", "vault": recorded_vault, "steps": steps,
    }


def test_a_journal_that_recorded_no_disk_identity_is_resumed(tmp_path, disk, vault):
    """Versions before the identity check wrote none: their unfinished setups still finish."""
    vault.down = True
    with pytest.raises(VaultUnreachable):
        run(make_options(tmp_path))
    vault.down = False
    state_file = tmp_path / "luks" / journal.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["identity"]
    state_file.write_text(json.dumps(state))

    report = run(make_options(tmp_path, token="wrapping-2"))
    assert report.resumed and disk.key == vault.secrets[str(REF)].encode()


@pytest.mark.parametrize("mounted_before_the_kill, rerun_events", [(False, ["mount /dev/mapper/crypt -o nosuid,nodev"]), (True, [])])
def test_kill_around_the_mount_resumes_with_the_mount_alone(tmp_path, disk, vault, monkeypatch, mounted_before_the_kill, rerun_events):
    """The mapper is open (ours: not "in use") and holds the filesystem already; mounted too, perhaps."""
    mount = volume.mount

    def killed(described, options):
        if mounted_before_the_kill:
            mount(described, options)
        raise Killed()

    monkeypatch.setattr(volume, "mount", killed)
    with pytest.raises(Killed):
        run(make_options(tmp_path))
    monkeypatch.setattr(volume, "mount", mount)
    disk.events.clear()
    ini = make_options(tmp_path).ini_path.stat().st_ino

    report = run(make_options(tmp_path, token=None))

    assert disk.events == rerun_events and report.resumed and disk.mounted
    assert make_options(tmp_path).ini_path.stat().st_ino == ini  # read, not written again
    assert setup.VOLUME_SUCCESS[0].exists() and not pending(tmp_path).exists()


# --- inputs and output ----------------------------------------------------------------------


def test_token_comes_from_a_file_or_stdin_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("hvs.file-token\n")
    assert read_token(str(path), io.BytesIO()) == "hvs.file-token"
    assert read_token("-", io.BytesIO(b"hvs.stdin-token\n")) == "hvs.stdin-token"
    with pytest.raises(Exception, match="empty"):
        read_token("-", io.BytesIO(b"\n"))


def test_wipe_progress_is_json_lines_and_zeroes_everything(tmp_path, monkeypatch):
    target = tmp_path / "mapper"
    target.write_bytes(b"\xff" * (3 * blockdev.ZERO_CHUNK // 2))
    out = io.StringIO()
    progress = setup.Progress(json_lines=True, out=out, err=io.StringIO(), tty=False)

    written = blockdev.zero_device(str(target), progress.wiped)

    assert written == target.stat().st_size and target.read_bytes() == bytes(written)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["percent"] for line in lines] == [66, 100] and lines[-1]["bytes_done"] == written


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stderr, shown", [(Terminal, "\rwiping:   1% of 0 MiB\rwiping: 100% of 0 MiB\n"), (io.StringIO, "")])
def test_wipe_progress_is_a_percentage_on_stderr_when_it_is_a_tty(stderr, shown):
    err = stderr()
    progress = setup.Progress(json_lines=False, out=io.StringIO(), err=err)
    progress.wiped(1, 100)
    progress.wiped(100, 100)
    assert err.getvalue() == shown


def test_wipe_progress_prints_each_percentage_once_and_counts_in_mib():
    out, err = io.StringIO(), io.StringIO()
    as_json = setup.Progress(json_lines=True, out=out, err=io.StringIO(), tty=False)
    on_tty = setup.Progress(json_lines=False, out=io.StringIO(), err=err, tty=True)
    total = 3 * 2**20
    for done in (2**20, 2**20 + 1, total):
        as_json.wiped(done, total)
        on_tty.wiped(done, total)
    setup.Progress(json_lines=True, out=out, err=io.StringIO(), tty=False).wiped(1, 1)

    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"event": "wipe", "bytes_done": 2**20, "bytes_total": total, "percent": 33},
        {"event": "wipe", "bytes_done": total, "bytes_total": total, "percent": 100},
        {"event": "wipe", "bytes_done": 1, "bytes_total": 1, "percent": 100},
    ]
    assert err.getvalue() == "\rwiping:  33% of 3 MiB\rwiping: 100% of 3 MiB\n"


@pytest.mark.parametrize("json_lines, report, shown", [
    (True, lambda progress: progress.wiped(1, 2), b'{"event": "wipe", "bytes_done": 1, "bytes_total": 2, "percent": 50}\n'),
    (False, lambda progress: progress.wiped(1, 2), b"\rwiping:  50% of 0 MiB"),
    (True, lambda progress: progress.step("mkfs", "making"), b'{"event": "step", "step": "mkfs", "message": "making"}\n'),
])
def test_progress_reaches_a_pipe_at_once(json_lines, report, shown):
    """The dashboard and a terminal read it while setup runs: each line is flushed, not buffered."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb", buffering=0) as reader, os.fdopen(write_end, "w") as writer:
        os.set_blocking(read_end, False)
        report(setup.Progress(json_lines=json_lines, out=writer, err=writer, tty=True))
        assert reader.read() == shown


def step(name: str, message: str) -> dict:
    return {"event": "step", "step": name, "message": message}


@pytest.mark.parametrize("json_lines", [True, False])
def test_each_step_is_a_json_line_on_stdout_with_json_else_a_log_line(tmp_path, disk, vault, zeroing, caplog, monkeypatch, json_lines):
    caplog.set_level(logging.INFO, logger="luksctl")
    monkeypatch.setattr(setup, "time", SimpleNamespace(monotonic=itertools.count(step=0.25).__next__))  # each timed step: 0.25 s
    out = io.StringIO()
    report = setup.run_setup(make_options(tmp_path, wipe=True), setup.Progress(json_lines=json_lines, out=out, err=io.StringIO(), tty=False))

    lines = [
        step("passphrase", f"passphrase saved to {pending(tmp_path)} until setup completes"),
        step("vault", f"storing the passphrase at {REF}"),
        step("format", f"formatting {DEVICE} (LUKS2, aes-xts-plain64, 512-bit key)"),
        step("encrypted", "LUKS encryption completed"),
        step("wipe", f"zeroing {MAPPER}"),
        {"event": "wipe", "bytes_done": 1, "bytes_total": 2, "percent": 50},
        {"event": "wipe", "bytes_done": 2, "bytes_total": 2, "percent": 100},
        step("mkfs", f"making a ext4 filesystem on {MAPPER}"),
        step("done", "Volume setup completed"),
    ]
    logged = [("luksctl", logging.INFO, line["message"]) for line in lines if line["event"] == "step"]
    printed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (printed, caplog.record_tuples) == ((lines, []) if json_lines else ([], logged))  # no warning either
    assert zeroing == [MAPPER]
    assert report == setup.SetupReport("mounted", DEVICE, UUID, changed=True, seconds={"vault": 0.25, "format": 0.25, "wipe": 0.25, "mkfs": 0.25})


@pytest.mark.parametrize("vault_down, kill_at, done", [
    (True, None, "nothing"),
    (False, ("mkfs.ext4",), "vault-write-started, vault-written, format-started, formatted, header-saved, ini-written, wiped, mkfs-started"),
])
def test_a_resumed_setup_says_what_was_done_and_zeroes_the_volume_once(tmp_path, disk, vault, zeroing, vault_down, kill_at, done):
    vault.down, disk.kill_at = vault_down, kill_at
    with pytest.raises((VaultUnreachable, Killed)):
        run(make_options(tmp_path, wipe=True))
    vault.down = False
    out = io.StringIO()

    setup.run_setup(make_options(tmp_path, token="wrapping-2", wipe=True), setup.Progress(json_lines=True, out=out, err=io.StringIO(), tty=False))

    assert json.loads(out.getvalue().splitlines()[0]) == step("resume", f"resuming the unfinished setup of {DEVICE} (done: {done})")
    assert zeroing == [MAPPER]


def test_step_timings_add_up_per_step_in_milliseconds(monkeypatch):
    clock = iter([10.0, 10.0012345, 20.0, 21.5])
    monkeypatch.setattr(setup, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    progress = setup.Progress(json_lines=False, err=io.StringIO(), tty=False)

    assert progress.timed("wipe", lambda: "zeroed") == "zeroed"
    assert progress.timings == {"wipe": 0.001}
    progress.timed("wipe", lambda: None)  # a resumed wipe adds to the time of the first
    assert progress.timings == {"wipe": 1.501}


def test_passphrase_length_is_8_to_512(tmp_path):
    for length in (8, 512):
        setup.validate_names(make_options(tmp_path, passphrase_length=length))
    for length in (7, 513):
        with pytest.raises(LuksctlError) as refused:
            setup.validate_names(make_options(tmp_path, passphrase_length=length))
        assert str(refused.value) == "the passphrase length must be between 8 and 512 characters"


@pytest.mark.parametrize("kept", [{"passphrase": b"the operator's own"}, {"save_passphrase_locally": True}])
def test_without_vault_the_passphrase_is_kept_by_the_operator_or_in_the_ini(tmp_path, kept):
    setup.validate_names(make_options(tmp_path, token="none", **kept))


def test_a_passphrase_that_would_be_stored_nowhere_is_refused(tmp_path):
    with pytest.raises(LuksctlError) as refused:
        setup.validate_names(make_options(tmp_path, token="none"))
    assert str(refused.value) == (
        "the passphrase would be stored nowhere: give the Vault location (--vault-url ...), "
        "or supply the passphrase yourself on stdin (--passphrase-stdin)")


def test_a_fixed_pbkdf_cost_reaches_luks_format(tmp_path):
    options = make_options(tmp_path, pbkdf="pbkdf2", iter_time=None, pbkdf_force_iterations=1000)
    assert options.luks_format().argv(DEVICE) == [
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64", "--key-size", "512",
        "--hash", "sha256", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", DEVICE,
    ]


def test_mount_options_are_not_taken_from_a_config_json_others_may_write(tmp_path, monkeypatch):
    """Root mounts with them: a group-writable config.json could add exec or suid."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"MOUNT_OPTIONS": "exec,suid"}))
    config.chmod(0o664)
    monkeypatch.setattr(setup, "API_CONFIG", config)

    with pytest.raises(ConfigError) as refused:
        setup.mount_options()
    assert str(refused.value) == f"{config} must be owned by root and not writable by group or others (owner uid {os.geteuid()}, mode 664)"


def test_the_ini_directory_is_made_0755_with_its_parents_whatever_the_umask(tmp_path, disk, vault):
    options = make_options(tmp_path, ini_path=tmp_path / "etc" / "luks" / "luks-cryptdev.ini")
    umask = os.umask(0)
    try:
        run(options)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(options.ini_path.parent.stat().st_mode) == 0o755 and options.ini_path.exists()


def test_cli_refuses_passphrase_and_token_both_on_stdin(capsys, monkeypatch):
    from luksctl.root import cli

    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    code = cli.main(["setup", "--device", DEVICE, "--vault-url", "https://v:8200", "--secret-path", "a/b",
                     "--passphrase-stdin", "--token-file", "-"], stdin=io.BytesIO(b"pw\n"), stdin_is_tty=False)
    assert code == 64
    assert "stdin cannot carry both" in capsys.readouterr().out


def test_a_second_setup_is_refused_while_one_runs(tmp_path, disk, vault, capsys, monkeypatch):
    import fcntl

    from luksctl.root import cli

    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli, "SETUP_LOCK", tmp_path / "setup.lock")
    with cli.SETUP_LOCK.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code = cli.main(["--json", "setup", "--device", DEVICE], stdin=io.BytesIO(), stdin_is_tty=False)

    assert code == 6 and disk.calls == [] and vault.unwrapped == []
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["event"] == "result" and "another luksctl setup" in result["error"]


def test_a_kv_v2_secret_is_not_read_first_as_the_create_only_write_refuses_to_overwrite(tmp_path, disk, vault):
    vault.capabilities = {"create", "update", "read"}
    vault.secrets[str(REF)] = "someone else's"

    with pytest.raises(SecretExists):
        run(make_options(tmp_path))
    assert disk.events == ["blkid -p", "vault write"] and vault.secrets[str(REF)] == "someone else's"


def test_a_token_that_may_not_look_up_its_capabilities_still_writes(tmp_path, disk, vault):
    vault.lookup_denied = True
    report = run(make_options(tmp_path))
    assert report.volume_state == "mounted" and vault.secrets == {str(REF): disk.key.decode()}


def test_a_secret_stored_as_another_version_than_1_is_warned_about(tmp_path, disk, vault, caplog):
    vault.version = 3
    run(make_options(tmp_path))
    assert [record for record in caplog.record_tuples if record[1] >= logging.WARNING] == [
        ("luksctl", logging.WARNING, f"Vault stored the passphrase as version 3 of {REF}, not version 1")]


def test_vault_is_reached_only_through_the_ca_bundle_given(tmp_path, disk, vault):
    bundle = tmp_path / "no-such-ca.pem"
    with pytest.raises(VaultError) as refused:
        run(make_options(tmp_path, vault=replace(make_options(tmp_path).vault, ca_bundle=str(bundle))))
    assert str(refused.value) == f"the CA bundle {bundle} cannot be loaded: No such file or directory"
    assert disk.key is None and vault.unwrapped == []


def test_kv_v1_secret_is_looked_for_first_when_the_token_may_read(tmp_path, disk, vault):
    """KV v1 has no cas: a token that may update would overwrite what is there."""
    ref = SecretRef("kv1", "sub/deploy-1/storage_encryption", "storage_encryption_key", 1)
    vault.capabilities = {"create", "update", "read"}
    vault.secrets[str(ref)] = "someone else's"
    options = replace(make_options(tmp_path), vault=setup.VaultTarget("https://v:8200", ref, token="wrapping-1"))

    with pytest.raises(SecretExists, match=rf"^{re.escape(str(ref))} already holds a secret; it was not overwritten$"):
        run(options)
    assert vault.secrets[str(ref)] == "someone else's" and disk.key is None
