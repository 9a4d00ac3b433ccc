"""blockdev on a sysfs and /proc laid out as the kernel lays them out, and `blkid -p` at the
runner seam: what a disk is, who uses it, what it holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from luksctl import runner
from luksctl.errors import CommandFailed, NotBlockDevice
from luksctl.root import blockdev
from luksctl.status import read_mounts


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(blockdev, "SYS_DEV_BLOCK", tmp_path)
    return tmp_path


def disk(sysfs, dev: str, files: dict[str, str]) -> blockdev.BlockDevice:
    for name, text in files.items():
        (sysfs / dev / name).parent.mkdir(parents=True, exist_ok=True)
        (sysfs / dev / name).write_text(text + "\n")
    return blockdev.BlockDevice("/dev/xyz", dev)


def test_a_virtio_disk_is_its_numbers_size_and_serial(sysfs):
    device = disk(sysfs, "254:16", {"size": "2097152", "serial": "vol-0a1b2c"})

    assert blockdev.identity(device) == {"dev": "254:16", "size": "2097152", "serial": "vol-0a1b2c"}


def test_a_scsi_disk_adds_its_wwn_and_an_empty_serial_is_no_serial(sysfs):
    device = disk(sysfs, "8:16", {"size": "41943040", "serial": "", "device/serial": "", "device/wwid": "naa.5000c500a1b2c3d4"})

    assert blockdev.identity(device) == {"dev": "8:16", "size": "41943040", "wwn": "naa.5000c500a1b2c3d4"}


def test_an_nvme_namespace_has_its_wwid_beside_it_and_its_serial_on_the_controller(sysfs):
    device = disk(sysfs, "259:0", {"size": "20971520", "wwid": "eui.0025388b71b1c2d3", "device/serial": "S4EWNX0R123456"})

    assert blockdev.identity(device) == {"dev": "259:0", "size": "20971520", "serial": "S4EWNX0R123456", "wwn": "eui.0025388b71b1c2d3"}


# --- the rest of blockdev, on a machine laid out as the kernel lays it out -------------------
# /sys/dev/block/254:16 links to the disk's directory under /sys/devices; its partitions are
# subdirectories holding a `partition` file, and `holders/` links to what is stacked on it.


class Machine:
    """/sys, /proc/self/mountinfo and /proc/swaps of a VM whose data disk is vdb (254:16)."""

    def __init__(self, root: Path):
        self.root = root
        self.dev_block = root / "sys/dev/block"
        self.mountinfo = root / "proc/self/mountinfo"
        self.swaps = root / "proc/swaps"
        self.vdb = root / "sys/devices/pci0000:00/0000:00:05.0/virtio4/block/vdb"
        self.dev_block.mkdir(parents=True)
        self.mountinfo.parent.mkdir(parents=True)
        self.vdb.mkdir(parents=True)
        (self.dev_block / "254:16").symlink_to(self.vdb)
        (self.vdb / "holders").mkdir()
        self.mountinfo.write_text("22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n")
        self.swaps.write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        self.device = blockdev.BlockDevice(str(root / "dev/vdb"), "254:16")

    def partition(self, number: int) -> Path:
        part = self.vdb / f"vdb{number}"
        (part / "holders").mkdir(parents=True)
        (part / "partition").write_text(f"{number}\n")
        (part / "dev").write_text(f"254:{16 + number}\n")
        return part

    def stack(self, on: Path, name: str, dm_name: str | None) -> None:
        """A device-mapper device (dm_name) or an md array (None) on the disk or a partition."""
        holder = self.root / "sys/devices/virtual/block" / name
        holder.mkdir(parents=True)
        if dm_name is not None:
            (holder / "dm").mkdir()
            (holder / "dm/name").write_text(dm_name + "\n")
        (on / "holders" / name).symlink_to(holder)

    def mount(self, dev: str, mountpoint: str) -> None:
        with self.mountinfo.open("a") as stream:
            stream.write(f"40 22 {dev} / {mountpoint} rw,relatime shared:9 - ext4 /dev/whatever rw\n")

    def swap(self, path: str, numbers: str | None) -> None:
        """A swap partition (a node with those numbers) or, with numbers None, a swap file."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if numbers is None:
            Path(path).write_bytes(b"")
        else:
            os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(*map(int, numbers.split(":"))))  # the tests run as root
        with self.swaps.open("a") as stream:
            stream.write(f"{path}\tpartition\t1048572\t\t0\t\t-2\n")


@pytest.fixture
def machine(tmp_path, monkeypatch) -> Machine:
    machine = Machine(tmp_path)
    monkeypatch.setattr(blockdev, "SYS_DEV_BLOCK", machine.dev_block)
    monkeypatch.setattr(blockdev, "PROC_SWAPS", machine.swaps)
    monkeypatch.setattr(blockdev, "read_mounts", lambda: read_mounts(machine.mountinfo))
    return machine


def test_an_idle_disk_has_no_users(machine):
    machine.partition(1)
    machine.swap(f"{machine.root}/dev/vda2", "254:2")  # another disk's swap

    assert blockdev.users(machine.device) == []


def test_users_are_its_mounts_its_swap_and_what_is_stacked_on_it(machine):
    vdb1 = machine.partition(1)
    machine.partition(2)
    machine.mount("254:16", "/mnt/data")
    machine.mount("254:17", "/srv")
    machine.swap(f"{machine.device.path}2", "254:18")
    machine.swap(f"{machine.device.path}b", "254:32")  # vdbb, another disk whose name starts with vdb's
    machine.swap(f"{machine.root}/srv/swapfile", None)  # a file on a filesystem: its mount is the user
    machine.stack(machine.vdb, "dm-0", "crypt")
    machine.stack(vdb1, "md127", None)

    assert blockdev.users(machine.device) == [
        f"{machine.device.path} is mounted on /mnt/data",
        "partition vdb1 is mounted on /srv",
        f"{machine.device.path}2 is in use as swap",
        "crypt (dm-0) is stacked on it (close it first)",
        "md127 (md127) is stacked on it (close it first)",
    ]


def test_the_allowed_mapper_is_not_a_user_but_any_other_stacked_device_is(machine):
    machine.stack(machine.vdb, "dm-0", "crypt")
    machine.stack(machine.vdb, "dm-1", "other")

    assert blockdev.holders(machine.device) == {"dm-0": "crypt", "dm-1": "other"}
    assert blockdev.users(machine.device, allowed_holder="crypt") == ["other (dm-1) is stacked on it (close it first)"]
    assert blockdev.users(machine.device, allowed_holder="other") == ["crypt (dm-0) is stacked on it (close it first)"]


def test_holders_of_the_disk_and_its_partitions_by_dm_name_or_else_sysfs_name(machine):
    machine.stack(machine.vdb, "dm-0", "crypt")
    machine.stack(machine.partition(1), "md127", None)

    assert blockdev.holders(machine.device) == {"dm-0": "crypt", "md127": "md127"}


def test_a_disk_gone_from_sysfs_has_no_partitions_and_holders(machine):
    (machine.dev_block / "254:16").unlink()
    machine.mount("254:16", "/mnt/data")

    assert blockdev.holders(machine.device) == {}
    assert blockdev.users(machine.device) == [f"{machine.device.path} is mounted on /mnt/data"]


class Blkid:
    """runner.run as `blkid -p` answers: (exit code, stdout, stderr); records each call."""

    def __init__(self, code: int, stdout: str = "", stderr: str = ""):
        self.answer = (code, stdout, stderr)
        self.calls = []

    def run(self, argv, *, timeout, stdin=None, check=True):
        self.calls.append((list(argv), timeout, stdin, check))
        code, stdout, stderr = self.answer
        if check and code:
            raise CommandFailed(f"{argv[0]} failed with exit code {code}", list(argv), code, stderr)
        return runner.Result(list(argv), code, stdout, stderr)


@pytest.fixture
def blkid(monkeypatch):
    def answering(code: int, stdout: str = "", stderr: str = "") -> Blkid:
        fake = Blkid(code, stdout, stderr)
        monkeypatch.setattr(runner, "run", fake.run)
        return fake

    return answering


def test_signatures_of_a_blank_disk_are_none_and_blkid_probes_it_read_only(machine, blkid):
    fake = blkid(2)  # blkid(8): nothing identified

    assert blockdev.signatures(machine.device) == []
    assert fake.calls == [(["blkid", "-p", "-o", "export", machine.device.path], blockdev.BLKID_TIMEOUT, None, False)]


def test_signatures_name_a_filesystem_or_luks_by_its_type(machine, blkid):
    blkid(0, f"DEVNAME={machine.device.path}\nUUID=5a0c2f1e-8d7b-4c3a-9e6f-1b2d3c4e5f60\nVERSION=2\nTYPE=crypto_LUKS\nUSAGE=crypto\n")

    assert blockdev.signatures(machine.device) == ["signature crypto_LUKS"]


def test_signatures_name_a_partition_table_and_each_partition(machine, blkid):
    blkid(0, f"DEVNAME={machine.device.path}\nPTUUID=0f1e2d3c\nPTTYPE=dos\n")
    machine.partition(1)

    assert blockdev.signatures(machine.device) == ["partition table dos", "partition vdb1"]


def test_blkid_failing_to_probe_is_an_error_not_a_blank_disk(machine, blkid):
    blkid(4, stderr="blkid: error: /dev/vdb: Input/output error\n")

    with pytest.raises(CommandFailed) as failed:
        blockdev.signatures(machine.device)
    assert (failed.value.message, failed.value.returncode) == (f"blkid could not probe {machine.device.path}", 4)
    assert failed.value.argv == ["blkid", "-p", "-o", "export", machine.device.path]
    assert failed.value.stderr == "blkid: error: /dev/vdb: Input/output error\n"


def test_a_block_device_is_its_path_and_numbers_through_a_symlink(tmp_path):
    node = tmp_path / "vdb"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(254, 16))  # the tests run as root
    (tmp_path / "by-id").symlink_to(node)

    assert blockdev.block_device(str(node)) == blockdev.BlockDevice(str(node), "254:16")
    assert blockdev.block_device(str(tmp_path / "by-id")) == blockdev.BlockDevice(str(tmp_path / "by-id"), "254:16")


def test_anything_but_a_block_device_is_refused_saying_why(tmp_path):
    regular = tmp_path / "disk.img"
    regular.write_bytes(b"")

    refusals = {}
    for path in (tmp_path / "missing", regular / "below-a-file", regular, tmp_path):
        with pytest.raises(NotBlockDevice) as refused:
            blockdev.block_device(str(path))
        refusals[path] = refused.value.message
    assert refusals == {
        tmp_path / "missing": f"{tmp_path}/missing does not exist",
        regular / "below-a-file": f"{regular}/below-a-file cannot be examined: Not a directory",
        regular: f"{regular} is not a block device; setup encrypts a whole disk such as /dev/vdb",
        tmp_path: f"{tmp_path} is not a block device; setup encrypts a whole disk such as /dev/vdb",
    }


def test_the_size_of_an_image_file_in_bytes(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (3 * 1024 * 1024 + 512))

    assert blockdev.size_in_bytes(str(image)) == 3 * 1024 * 1024 + 512


def test_zero_device_writes_zeros_over_exactly_the_device_reporting_each_chunk(tmp_path):
    mapper = tmp_path / "mapper"
    size = 3 * blockdev.ZERO_CHUNK // 2 + 512
    mapper.write_bytes(b"\xff" * size)
    reports = []

    def report(done: int, total: int) -> None:
        # Fails at the first wrong count, before a broken loop could write on past the end.
        assert total == size and (reports[-1] if reports else 0) < done <= total, f"report({done}, {total}) after {reports}"
        reports.append(done)

    assert blockdev.zero_device(str(mapper), report) == size
    assert reports == [blockdev.ZERO_CHUNK, size]
    assert mapper.stat().st_size == size and mapper.read_bytes() == bytes(size)
