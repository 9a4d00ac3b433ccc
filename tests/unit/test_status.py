"""status.py: /proc/self/mountinfo parsing and state from a fake /sys/block tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from luksctl.status import Mount, VolumeState, nfs_mount_states, parse_mountinfo, volume_status

FIXTURES = Path(__file__).parent / "fixtures"


def test_parse_mountinfo_fixture():
    mounts = parse_mountinfo((FIXTURES / "mountinfo.txt").read_text())

    assert mounts == [
        Mount("8:1", "/", "ext4", "/dev/sda1"),
        Mount("0:21", "/proc", "proc", "proc"),
        Mount("254:0", "/export", "ext4", "/dev/mapper/xkqzbmwe"),
        Mount("254:1", "/srv/my data", "ext4", "/dev/mapper/other dev"),
        Mount("0:50", "/home", "nfs4", "10.0.0.1:/home"),
        Mount("0:51", "/mnt/back\\slash\ttab", "nfs", "server:/export x"),
    ]


@pytest.mark.parametrize(
    "line, fstype",
    [
        ("40 22 254:0 / /export rw - ext4 /dev/dm-0 rw", "ext4"),  # no optional fields
        ("40 22 254:0 / /export rw shared:1 - ext4 /dev/dm-0 rw", "ext4"),
        ("40 22 254:0 / /export rw shared:1 master:7 propagate_from:2 unbindable - xfs /dev/dm-0 rw", "xfs"),
    ],
)
def test_optional_fields_before_the_separator_are_skipped(line, fstype):
    assert parse_mountinfo(line) == [Mount("254:0", "/export", fstype, "/dev/dm-0")]


def test_a_mountpoint_named_dash_is_not_mistaken_for_the_separator():
    assert parse_mountinfo("50 22 254:0 / /- rw - ext4 /dev/dm-0 rw") == [Mount("254:0", "/-", "ext4", "/dev/dm-0")]


def test_lines_that_are_not_mount_lines_are_ignored():
    assert parse_mountinfo("\ngarbage\n1 2 3\n") == []


def make_sys_block(root: Path, devices: dict[str, tuple[str, str]]) -> Path:
    """devices: {"dm-0": (name, "major:minor")}, laid out as /sys/block/dm-N/{dm/name,dev}."""
    for entry, (name, dev) in devices.items():
        (root / entry / "dm").mkdir(parents=True)
        (root / entry / "dm" / "name").write_text(name + "\n")
        (root / entry / "dev").write_text(dev + "\n")
    return root


@pytest.fixture
def sys_block(tmp_path) -> Path:
    return make_sys_block(tmp_path / "block", {"dm-0": ("xkqzbmwe", "254:0"), "dm-1": ("other", "254:1")})


def mountinfo(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n" + "".join(line + "\n" for line in lines))
    return path


def test_mounted_when_our_mapper_device_is_on_the_mountpoint(tmp_path, sys_block):
    info = mountinfo(tmp_path, "40 22 254:0 / /export rw shared:2 - ext4 /dev/mapper/xkqzbmwe rw")

    status = volume_status("xkqzbmwe", "/export", sys_block=sys_block, mountinfo=info)

    assert (status.mapper_device, status.mounted, status.state) == ("254:0", True, VolumeState.MOUNTED)


def test_mapped_but_not_mounted(tmp_path, sys_block):
    status = volume_status("xkqzbmwe", "/export", sys_block=sys_block, mountinfo=mountinfo(tmp_path))

    assert (status.mapper_open, status.mounted, status.state) == (True, False, VolumeState.UNMOUNTED)


def test_closed_when_no_device_mapper_device_has_the_name(tmp_path):
    sys_block = make_sys_block(tmp_path / "block", {"dm-0": ("other", "254:1")})
    info = mountinfo(tmp_path, "40 22 254:1 / /export rw - ext4 /dev/mapper/other rw")

    status = volume_status("xkqzbmwe", "/export", sys_block=sys_block, mountinfo=info)

    assert (status.mapper_device, status.mounted) == (None, False)


def test_closed_with_an_empty_sys_block(tmp_path):
    (tmp_path / "block").mkdir()

    status = volume_status("xkqzbmwe", "/export", sys_block=tmp_path / "block", mountinfo=mountinfo(tmp_path))

    assert not status.mapper_open and not status.mounted


def test_our_device_mounted_elsewhere_is_not_mounted(tmp_path, sys_block):
    info = mountinfo(tmp_path, "40 22 254:0 / /mnt/elsewhere rw - ext4 /dev/mapper/xkqzbmwe rw")

    status = volume_status("xkqzbmwe", "/export", sys_block=sys_block, mountinfo=info)

    assert status.mapper_open and not status.mounted


def test_a_different_device_on_the_mountpoint_is_not_mounted(tmp_path, sys_block):
    info = mountinfo(tmp_path, "40 22 254:1 / /export rw - ext4 /dev/mapper/other rw")

    status = volume_status("xkqzbmwe", "/export", sys_block=sys_block, mountinfo=info)

    assert status.mapper_open and not status.mounted


def test_mountpoint_with_a_space_matches_its_escaped_form(tmp_path, sys_block):
    info = mountinfo(tmp_path, r"40 22 254:0 / /srv/my\040data rw - ext4 /dev/mapper/xkqzbmwe rw")

    assert volume_status("xkqzbmwe", "/srv/my data", sys_block=sys_block, mountinfo=info).mounted


def test_nfs_mount_states_counts_nfs_and_nfs4_only(tmp_path):
    info = mountinfo(
        tmp_path,
        "42 22 0:50 / /home rw - nfs4 10.0.0.1:/home rw",
        "43 22 0:51 / /data rw - nfs 10.0.0.1:/data rw",
        "44 22 254:0 / /export rw - ext4 /dev/mapper/xkqzbmwe rw",
    )

    states = nfs_mount_states(["/home", "/data", "/export", "/absent"], mountinfo=info)

    assert states == {"/home": True, "/data": True, "/export": False, "/absent": False}
