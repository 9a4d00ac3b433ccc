"""The two apps in-process, with the kernel, Vault and the privileged bridge faked.

Nothing here touches the network, /sys, /proc/self/mountinfo or sudo:
- the volume state and the NFS mount states are a scripted `Host`,
- Vault's answer is faked (`fetch_passphrase`), and VAULT_URL_ALLOWLIST only
  lets http://127.0.0.1:1 through (any other vault_url must answer 400),
- the bridge flips the scripted state the way the real `luksctl open` /
  `luksctl nfs-mount` would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from luksctl.status import VolumeStatus

ALLOWED_VAULT = "http://127.0.0.1:1"
CLUSTER_TOKEN = "s3cr3t-cluster-token"
NFS_MOUNTPOINTS = ["/home", "/export"]
INI = """\
[luks]
cipher_algorithm = aes-xts-plain64
device = /dev/vdb
uuid = 0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10
cryptdev = xkqzbmwe
mapper = /dev/mapper/xkqzbmwe
mountpoint = /export
filesystem = ext4

[luksctl_api]
unknown = sections must not matter
"""


@dataclass
class Host:
    """Scripted kernel state plus a record of what the privileged side was asked to do."""

    mounted: bool = False
    nfs_mounted: set[str] = field(default_factory=set)
    opens: int = 0
    nfs_mounts: int = 0
    vault_calls: list[str] = field(default_factory=list)
    # Set to an exception instance to make the next open_volume / fetch_passphrase raise it.
    open_error: Exception | None = None
    vault_error: Exception | None = None
    # True: reading the mount table fails, as when /proc/self/mountinfo cannot be read.
    unreadable: bool = False

    # -- the kernel --
    def volume_status(self, cryptdev: str, mountpoint: str, **_kw) -> VolumeStatus:
        if self.unreadable:
            raise OSError(5, "Input/output error")
        return VolumeStatus("254:0" if self.mounted else None, self.mounted)

    def nfs_mount_states(self, mountpoints: list[str], **_kw) -> dict[str, bool]:
        if self.unreadable:
            raise OSError(5, "Input/output error")
        return {mountpoint: mountpoint in self.nfs_mounted for mountpoint in mountpoints}

    # -- Vault --
    def fetch_passphrase(self, url, ref, wrapping_token: str, settings) -> str:
        assert url == ALLOWED_VAULT, f"Vault contacted at {url}"
        self.vault_calls.append(url)
        if self.vault_error is not None:
            raise self.vault_error
        return "correct horse battery staple"

    # -- the privileged bridge (PrivilegedBridge protocol) --
    def open_volume(self, passphrase: str) -> dict:
        assert passphrase == "correct horse battery staple"
        self.opens += 1
        if self.open_error is not None:
            raise self.open_error
        self.mounted = True
        return {"volume_state": "mounted"}

    def nfs_mount(self) -> dict:
        self.nfs_mounts += 1
        self.nfs_mounted = set(NFS_MOUNTPOINTS)
        return {"nfs_state": "mounted"}
