"""One error hierarchy for the CLI and both APIs.

Each class carries its CLI exit code and its HTTP status; the surfaces only
look them up: `luksctl`'s front door (root/cli.py) turns an error into an exit
code and an audit line, api/errors.py into a JSON answer, and the sudo bridge
(api/privileged.py) turns luksctl's exit code back into an error.
Messages are written for a person and never contain a secret.
"""

from __future__ import annotations

# CLI exit codes (documented in the README, section "Exit codes").
EXIT_OK = 0
EXIT_NOT_OPEN = 1
EXIT_WRONG_PASSPHRASE = 2
EXIT_CONFIG = 3
EXIT_COMMAND_FAILED = 4
EXIT_ACTION_FAILED = 5
EXIT_BUSY = 6
EXIT_REFUSED = 7
EXIT_STALE_BACKUP = 8
EXIT_USAGE = 64
# `luksctl setup` refusals: each changes nothing on the device.
EXIT_DEVICE_IN_USE = 10
EXIT_NOT_BLOCK_DEVICE = 11
EXIT_DEVICE_NOT_BLANK = 12
EXIT_VAULT_WRITE_DENIED = 13
EXIT_SECRET_EXISTS = 14
EXIT_VAULT_UNREACHABLE = 15
EXIT_SETUP_CONFLICT = 16


class LuksctlError(Exception):
    """Base class: a failure with a message that is safe to show anyone."""

    exit_code = EXIT_COMMAND_FAILED
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(LuksctlError):
    """Options that contradict each other; argparse's own errors exit with the same code."""

    exit_code = EXIT_USAGE


class ConfigError(LuksctlError):
    """A config file is missing, unsafe or invalid; the message names the file and key."""

    exit_code = EXIT_CONFIG
    http_status = 500


class CommandFailed(LuksctlError):
    """An external command failed. Keeps argv, exit code and stderr for the log."""

    def __init__(self, message: str, argv: list[str], returncode: int | None, stderr: str):
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr

    def detail(self) -> str:
        return f"{self.message} (argv={self.argv}, exit={self.returncode}, stderr={self.stderr.strip()!r})"


class StdinNotClosed(LuksctlError):
    """`luksctl open` got no end of file on stdin in time: a caller's mistake, like bad arguments."""

    exit_code = EXIT_USAGE


class DeviceNotFound(LuksctlError):
    """The LUKS device named by the ini's uuid is not attached."""


class WrongPassphrase(LuksctlError):
    exit_code = EXIT_WRONG_PASSPHRASE
    http_status = 422


class VolumeBusy(LuksctlError):
    """The filesystem is in use, so it stays mounted and open."""

    exit_code = EXIT_NOT_OPEN
    http_status = 409


class LockTimeout(LuksctlError):
    """Another open or close is still running."""

    exit_code = EXIT_BUSY
    http_status = 503


class ActionFailed(LuksctlError):
    """The volume is mounted but a post-open action (docker, NFS) failed."""

    exit_code = EXIT_ACTION_FAILED
    http_status = 500


class Refused(LuksctlError):
    """A lifecycle command would be unsafe, or was not confirmed; nothing was changed."""

    exit_code = EXIT_REFUSED
    http_status = 409


class NfsMountIncomplete(LuksctlError):
    """A worker's `mount -a` left some NFS mountpoints unmounted."""

    exit_code = EXIT_NOT_OPEN
    http_status = 502


class TooManyFailures(LuksctlError):
    http_status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class BodyTooLarge(LuksctlError):
    http_status = 413


class UnsupportedMediaType(LuksctlError):
    http_status = 415


class CallerRefused(LuksctlError):
    http_status = 403


class BadRequest(LuksctlError):
    http_status = 400


class VaultError(LuksctlError):
    http_status = 502


class VaultUnreachable(VaultError):
    exit_code = EXIT_VAULT_UNREACHABLE
    http_status = 502


class WrappingTokenInvalid(VaultError):
    http_status = 403

    def __init__(self, message: str, *, possible_interception: bool = False):
        super().__init__(message)
        self.possible_interception = possible_interception


class VaultDenied(VaultError):
    http_status = 403


class SecretNotFound(VaultError):
    http_status = 404


class VaultWriteDenied(VaultDenied):
    """The token may not create the secret (or, create-only, the path already holds one)."""

    exit_code = EXIT_VAULT_WRITE_DENIED


class SecretExists(VaultError):
    """A create-only (cas=0) write found a secret already there; nothing was overwritten."""

    exit_code = EXIT_SECRET_EXISTS
    http_status = 409


class DeviceInUse(LuksctlError):
    """The device (or a partition of it) is mounted, mapped or used as swap; --force never overrides this."""

    exit_code = EXIT_DEVICE_IN_USE


class NotBlockDevice(LuksctlError):
    exit_code = EXIT_NOT_BLOCK_DEVICE


class DeviceNotBlank(LuksctlError):
    """A filesystem, partition table or LUKS signature is on the device; --force overrides only this."""

    exit_code = EXIT_DEVICE_NOT_BLANK


class SetupConflict(LuksctlError):
    """Setup would overwrite or contradict something it did not make (a header backup, an unfinished setup)."""

    exit_code = EXIT_SETUP_CONFLICT


class PrivilegedCallFailed(LuksctlError):
    """`sudo -n luksctl` could not run at all (sudoers, missing binary)."""

    http_status = 500


# The CLI's exit code -> the error the API bridge raises for it (others: LuksctlError).
ERROR_FOR_EXIT_CODE: dict[int, type[LuksctlError]] = {
    EXIT_WRONG_PASSPHRASE: WrongPassphrase,
    EXIT_CONFIG: ConfigError,
    EXIT_ACTION_FAILED: ActionFailed,
    EXIT_BUSY: LockTimeout,
    EXIT_NOT_OPEN: VolumeBusy,
}
