"""`luksctl`: the root CLI and the API's only privileged door.

The commands the services run take no path, command or option from their
caller beyond the action itself: what they act on comes from root-owned files
in fixed places. The sudoers rules (deploy/sudoers.d) name whole command lines,
so they grant the front-end API `luksctl --json open` and `luksctl --json
status`, and the worker API `luksctl --json nfs-mount`, of the configured
volume and nothing else; every other command is for root alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import sys
import time
from collections import namedtuple
from pathlib import Path

from ..config import API_CONFIG, VOLUME_INI, FrontendConfig, WorkerConfig, load_json_config, load_volume_config
from ..errors import EXIT_ACTION_FAILED, EXIT_COMMAND_FAILED, EXIT_NOT_OPEN, EXIT_OK, EXIT_USAGE, CommandFailed, LuksctlError, StdinNotClosed
from ..status import VolumeState, nfs_mount_states, volume_status

# `status` runs on every open and every poll of a worker: it imports neither logging nor
# dataclasses (4.5 and 3.7 ms of a 35 ms start, BENCHMARKS.md), nor the modules that change
# something. The commands that need them import them when they run.

LOCK_FILE = Path("/run/luksctl.lock")
LOCK_WAIT = 200  # longer than one open takes, even on a slow VM
# open and nfs-mount, which the services run through sudo, wait for the lock at most this share
# of config.json's PRIVILEGED_TIMEOUT and leave the rest to the work itself: the service then
# hears exit 6 (its 503) before its own time limit kills the call (a 500 that says nothing).
SERVICE_LOCK_SHARE = 0.5
MAX_PASSPHRASE_BYTES = 64 * 1024
STDIN_DEADLINE = 30  # the API writes the passphrase and closes at once; a person pipes it in


class Paths(namedtuple("Paths", "volume_ini api_config lock_file root_owned", defaults=(VOLUME_INI, API_CONFIG, LOCK_FILE, True))):
    """Where the CLI reads from: fixed in production, replaced in tests."""

    __slots__ = ()


class Report:
    """What a command found or did. --json prints the fields that are set, in this order."""

    def __init__(self, volume_state: str | None = None, mapper_open: bool | None = None, mounted: bool | None = None,
                 changed: bool = False, actions: list[dict] | None = None, nfs_state: str | None = None,
                 mountpoints: dict[str, bool] | None = None) -> None:
        self.volume_state = volume_state
        self.mapper_open = mapper_open
        self.mounted = mounted
        self.changed = changed
        self.actions = actions
        self.nfs_state = nfs_state
        self.mountpoints = mountpoints
        self.error: str | None = None
        self.details: dict | None = None  # a lifecycle command's own fields, at the top level of --json
        self.text: list[str] | None = None  # its text report
        self.exit_code: int | None = None  # its exit code, when not "mounted or not"

    @property
    def ok(self) -> bool:
        if self.nfs_state is not None:
            return self.nfs_state == VolumeState.MOUNTED.value
        return self.volume_state == VolumeState.MOUNTED.value


class _HelpFormatter(argparse.HelpFormatter):
    """Help at most 80 columns wide (as click's), narrower on a narrower terminal.

    argparse makes a formatter for every add_argument, only to check its metavar, and one
    given no width imports shutil (with bz2 and lzma) to ask the terminal's: 1.4 ms of each
    `luksctl status` (BENCHMARKS.md). os asks the terminal without that.
    """

    def __init__(self, prog: str) -> None:
        try:
            width = min(80, os.get_terminal_size(sys.stdout.fileno()).columns)
        except (OSError, ValueError):  # not a terminal, or no stdout
            width = 80
        super().__init__(prog, width=width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, formatter_class=_HelpFormatter, **kwargs)

    def error(self, message: str):  # argparse exits 2, which we reserve for a wrong passphrase
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(core_only: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(prog="luksctl", description="Open, close and report the LUKS volume of /etc/luks/luks-cryptdev.ini.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, help_text in (
        ("status", "report whether the volume is open and mounted (exit 0 if so, 1 if not)"),
        ("open", "read the passphrase from stdin, open and mount the volume, run post-open actions"),
        ("close", "unmount and close the volume"),
        ("nfs-mount", "worker node: mount the NFS entries of /etc/fstab"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if core_only:  # what sudo lets the services run: no need for setup's and the lifecycle's code
        return parser
    from . import (
        lifecycle,
        setup_cli,  # the root Vault client and header code: tens of ms to import
    )

    setup_help = "encrypt a blank device, store its passphrase in Vault, make and mount the filesystem (resumable)"
    sub = commands.add_parser("setup", help=setup_help, description=setup_help, allow_abbrev=False)  # "--token" must not mean --token-file
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="progress and result as JSON lines")
    setup_cli.add_setup_arguments(sub)
    lifecycle.add_commands(commands)
    return parser


def read_passphrase(stream: io.BufferedIOBase, is_tty: bool) -> bytes:
    """The passphrase as the old tools piped it: everything before one trailing newline."""
    if is_tty:
        import getpass

        return getpass.getpass("Passphrase: ").encode()
    try:
        fd = stream.fileno()
    except io.UnsupportedOperation:  # an in-memory stream (tests, callers of main()): nothing to wait for
        data = stream.read(MAX_PASSPHRASE_BYTES + 1)
    else:
        data = _read_until_eof(fd, MAX_PASSPHRASE_BYTES + 1, STDIN_DEADLINE)
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise LuksctlError(f"the passphrase on stdin is longer than {MAX_PASSPHRASE_BYTES} bytes")
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise LuksctlError("no passphrase on stdin (pipe it in: printf '%s\\n' \"$PASS\" | luksctl open)")
    return data


def _read_until_eof(fd: int, limit: int, timeout: float) -> bytes:
    """Up to `limit` bytes, until end of file; a writer that never closes its end gets an
    error after `timeout` seconds instead of holding this process forever."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise StdinNotClosed(
                f"stdin was not closed within {timeout:g} s; end the passphrase with end of file "
                "(printf '%s\\n' \"$PASS\" | luksctl open)"
            )
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _logger():
    """luksctl's logger, writing to stderr; set up on first use (see the imports)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="luksctl: %(message)s", stream=sys.stderr)
    return logging.getLogger("luksctl")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LuksctlError("this command must run as root (sudo luksctl ...)")


def _status_report(paths: Paths) -> Report:
    vol = load_volume_config(paths.volume_ini, root_owned=paths.root_owned)
    status = volume_status(vol.cryptdev, vol.mountpoint)
    return Report(status.state.value, status.mapper_open, status.mounted)


def cmd_status(paths: Paths, stdin: io.BufferedIOBase, stdin_is_tty: bool) -> Report:
    return _status_report(paths)


def _service_lock_wait(config: FrontendConfig | WorkerConfig) -> float:
    return min(LOCK_WAIT, config.PRIVILEGED_TIMEOUT * SERVICE_LOCK_SHARE)


def cmd_open(paths: Paths, stdin: io.BufferedIOBase, stdin_is_tty: bool) -> Report:
    from dataclasses import asdict

    from ..locking import exclusive_lock
    from . import services, volume

    _require_root()
    vol = load_volume_config(paths.volume_ini, root_owned=paths.root_owned)
    config = load_json_config(FrontendConfig, paths.api_config, root_owned=paths.root_owned, missing_ok=True)
    if volume.current_status(vol).mounted:
        return _status_report(paths)  # nothing to do, and no passphrase needed
    # Read before locking: a caller slow to send (or close) stdin must not hold up a close.
    passphrase = read_passphrase(stdin, stdin_is_tty)
    with exclusive_lock(paths.lock_file, timeout=_service_lock_wait(config), what="luksctl open or close"):
        if volume.current_status(vol).mounted:
            return _status_report(paths)  # another open finished while we read
        outcome = volume.open_volume(vol, passphrase, config.MOUNT_OPTIONS)
        results = services.run_post_open_actions(config)
    status = outcome.status
    return Report(status.state.value, status.mapper_open, status.mounted, outcome.changed, [asdict(r) for r in results])


def cmd_close(paths: Paths, stdin: io.BufferedIOBase, stdin_is_tty: bool) -> Report:
    from ..locking import exclusive_lock
    from . import volume

    _require_root()
    vol = load_volume_config(paths.volume_ini, root_owned=paths.root_owned)
    with exclusive_lock(paths.lock_file, timeout=LOCK_WAIT, what="luksctl open or close"):
        outcome = volume.close_volume(vol)
    return Report(outcome.status.state.value, outcome.status.mapper_open, outcome.status.mounted, outcome.changed)


def cmd_nfs_mount(paths: Paths, stdin: io.BufferedIOBase, stdin_is_tty: bool) -> Report:
    from ..locking import exclusive_lock
    from . import services

    _require_root()
    config = load_json_config(WorkerConfig, paths.api_config, root_owned=paths.root_owned)
    changed = False
    with exclusive_lock(paths.lock_file, timeout=_service_lock_wait(config), what="luksctl open, close or nfs-mount"):
        if not all(nfs_mount_states(config.NFS_MOUNTPOINT_LIST).values()):
            changed = True
            try:
                services.mount_nfs_shares()
            except CommandFailed as exc:  # some entries may have mounted: report each one below
                _logger().error("%s", exc.detail())
    states = nfs_mount_states(config.NFS_MOUNTPOINT_LIST)
    state = VolumeState.MOUNTED if all(states.values()) else VolumeState.UNMOUNTED
    return Report(changed=changed, nfs_state=state.value, mountpoints=states)


COMMANDS = {"status": cmd_status, "open": cmd_open, "close": cmd_close, "nfs-mount": cmd_nfs_mount}


def run_lifecycle_command(args: argparse.Namespace, paths: Paths, stdin: io.BufferedIOBase, stdin_is_tty: bool) -> Report:
    from . import lifecycle

    _require_root()
    context = lifecycle.Context(paths.volume_ini, paths.lock_file, LOCK_WAIT, paths.root_owned, stdin, stdin_is_tty, lambda: read_passphrase(stdin, stdin_is_tty))
    outcome = lifecycle.run(args, context)
    report = _state_after_error(paths)  # the volume's state, or "unavailable" once it is gone
    report.changed, report.details, report.text, report.exit_code = outcome.changed, outcome.details, outcome.text, outcome.exit_code
    return report


def print_text(command: str, report: Report, out: io.TextIOBase) -> None:
    if report.text is not None:
        print("\n".join(report.text), file=out)
        return
    if command == "close":
        print(f"Encrypted volume umount: [ {'OK' if report.mapper_open is False else 'FAIL'} ]", file=out)
        return
    if command == "nfs-mount":
        for mountpoint, mounted in (report.mountpoints or {}).items():
            print(f"NFS {mountpoint}: {'mounted' if mounted else 'not mounted'}", file=out)
        print(f"NFS shares: [ {'OK' if report.ok else 'FAIL'} ]", file=out)
        return
    for action in report.actions or []:
        print(f"{action['name']}: {'done' if action['ok'] else 'FAILED: ' + str(action['error'])}", file=out)
    if report.mapper_open is not None:
        print(f"Mapper device:    {'open' if report.mapper_open else 'closed'}", file=out)
        print(f"Filesystem:       {'mounted' if report.mounted else 'not mounted'}", file=out)
    print(f"Encrypted volume: [ {'OK' if report.ok else 'FAIL'} ]", file=out)


def _state_after_error(paths: Paths) -> Report:
    try:
        return _status_report(paths)
    except LuksctlError:
        return Report(VolumeState.UNAVAILABLE.value)


def main(argv: list[str] | None = None, *, paths: Paths = Paths(), stdin: io.BufferedIOBase | None = None, stdin_is_tty: bool | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = next((word for word in words if not word.startswith("-")), None)
    args = build_parser(core_only=command in COMMANDS).parse_args(argv)
    if args.command != "status":
        _logger()  # the commands that change something log what they run
    started = time.monotonic()
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdin_is_tty = stdin_is_tty if stdin_is_tty is not None else sys.stdin.isatty()
    if args.command == "setup":
        from . import setup_cli

        return setup_cli.run(lambda: setup_cli.options_from_args(args, stdin), stdin=stdin, json_output=args.json)
    error_class = None
    try:
        if args.command in COMMANDS:
            report = COMMANDS[args.command](paths, stdin, stdin_is_tty)
        else:
            report = run_lifecycle_command(args, paths, stdin, stdin_is_tty)
        if report.exit_code is not None:
            exit_code = report.exit_code
        else:
            exit_code = EXIT_OK if report.ok or args.command == "close" else EXIT_NOT_OPEN
        failed = [action["name"] for action in report.actions or [] if not action["ok"]]
        if failed:
            report.error = f"the volume is mounted, but these post-open actions failed: {', '.join(failed)}"
            exit_code = EXIT_ACTION_FAILED
    except LuksctlError as exc:
        _logger().error("%s", exc.detail() if isinstance(exc, CommandFailed) else exc.message)
        report = _state_after_error(paths)
        report.error = exc.message
        exit_code = exc.exit_code
        error_class = exc.__class__.__name__
    except Exception as exc:  # still answer the caller (the API) in JSON, and audit
        _logger().exception("unexpected error")
        report = _state_after_error(paths)
        report.error = f"internal error ({exc.__class__.__name__}); see the log"
        exit_code = EXIT_COMMAND_FAILED
        error_class = exc.__class__.__name__
    if args.command not in ("status", "report"):
        from .. import audit

        audit.use_syslog()
        audit.record(
            action=" ".join(filter(None, (args.command, getattr(args, "action", None)))),
            client=f"uid {os.environ.get('SUDO_UID', os.getuid())}",
            outcome="ok" if exit_code in (EXIT_OK,) else "error",
            status=exit_code,
            duration_ms=(time.monotonic() - started) * 1000,
            error_class=error_class,
        )
    if args.json:
        fields = {key: value for key, value in vars(report).items() if value is not None and key not in ("details", "text", "exit_code")}
        print(json.dumps({**fields, **(report.details or {})}))
    else:
        print_text(args.command, report, sys.stdout)
    return exit_code

