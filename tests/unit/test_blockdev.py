"""blockdev.identity on a sysfs tree laid out as the kernel lays out a virtio and a SCSI disk."""

from __future__ import annotations

import pytest

from luksctl.root import blockdev


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
