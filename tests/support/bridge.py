"""The fake privileged bridge: what `sudo luksctl open` / `sudo luksctl nfs-mount` would do,
on scripted state, for the apps' tests (the PrivilegedBridge protocol)."""

from __future__ import annotations

import time
from collections.abc import Callable

from luksctl.status import VolumeStatus


class Kernel:
    """Scripted volume state behind luksctl.api.frontend.volume_status."""

    def __init__(self):
        self.mounted = False
        self.reads: list[tuple[str, str]] = []

    def volume_status(self, cryptdev, mountpoint, **kwargs):
        self.reads.append((cryptdev, mountpoint))
        return VolumeStatus("254:0" if self.mounted else None, self.mounted)


class FakeBridge:
    """Each call is recorded, waits `delay`, raises `error` when set, and only then acts:
    open mounts `kernel`'s volume; nfs-mount runs `nfs_mount_action` and answers with its
    result. Without a kernel (a worker) or an action (the front end), that call is a test failure.
    """

    def __init__(self, kernel: Kernel | None = None, nfs_mount_action: Callable[[], dict] | None = None):
        self.kernel = kernel
        self.nfs_mount_action = nfs_mount_action
        self.passphrases: list[str] = []
        self.nfs_mounts = 0
        self.error: Exception | None = None
        self.delay = 0.0

    def _called(self) -> None:
        time.sleep(self.delay)
        if self.error:
            raise self.error

    def open_volume(self, passphrase: str) -> dict:
        self.passphrases.append(passphrase)
        assert self.kernel is not None, "a worker never opens the volume"
        self._called()
        self.kernel.mounted = True
        return {"volume_state": "mounted"}

    def nfs_mount(self) -> dict:
        self.nfs_mounts += 1
        assert self.nfs_mount_action is not None, "the front end never remounts NFS shares itself"
        self._called()
        return self.nfs_mount_action()
