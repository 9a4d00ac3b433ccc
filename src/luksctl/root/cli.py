"""`luksctl`: the root CLI and the API's only privileged door.

The commands the services run take no path, command or option from their
caller beyond the action itself: what they act on comes from root-owned files
in fixed places. The sudoers rules (deploy/sudoers.d) name whole command lines,
so they grant the front-end API `luksctl --json open` and `luksctl --json
status`, and the worker API `luksctl --json nfs-mount`, of the configured
volume and nothing else; every other command is for root alone. Every command,
and `fastluks`, goes through run_command: one root check, one map from errors
to exit codes, one audit line, one printer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

from ..config import API_CONFIG, VOLUME_INI, FrontendConfig, WorkerConfig, load_json_config, load_volume_config
from ..errors import EXIT_ACTION_FAILED, EXIT_COMMAND_FAILED, EXIT_NOT_OPEN, EXIT_OK, EXIT_USAGE, CommandFailed, LuksctlError
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
SETUP_LOCK = Path("/run/luksctl-setup.lock")
SETUP_LOCK_WAIT = 1  # a second setup on the same machine is refused, not queued


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
        self.audited = True  # False: no audit line (a dry run changes nothing)

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


def _logger():
    """luksctl's logger, writing to stderr; set up on first use (see the imports)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="luksctl: %(message)s", stream=sys.stderr)
    return logging.getLogger("luksctl")


class Request(namedtuple("Request", "args paths stdin stdin_is_tty audit")):
    """What a command gets: its parsed arguments, where to read from, and stdin; `audit` is
    its own fields for the audit line (volume, vault_path), filled in as it learns them."""

    __slots__ = ()


class Handler(namedtuple("Handler", "run failed print audited", defaults=(None, None, True))):
    """One command. run(request) -> Report; failed(request) -> the Report a failure is told in
    (default: the volume's state); print(request, report, out) -> its text or JSON (default:
    the volume report); audited: whether it writes an audit line (status and report do not)."""

    __slots__ = ()


def _status_report(paths: Paths) -> Report:
    vol = load_volume_config(paths.volume_ini, root_owned=paths.root_owned)
    status = volume_status(vol.cryptdev, vol.mountpoint)
    return Report(status.state.value, status.mapper_open, status.mounted)


def cmd_status(request: Request) -> Report:
    return _status_report(request.paths)


def _service_lock_wait(config: FrontendConfig | WorkerConfig) -> float:
    return min(LOCK_WAIT, config.PRIVILEGED_TIMEOUT * SERVICE_LOCK_SHARE)


def cmd_open(request: Request) -> Report:
    from dataclasses import asdict

    from ..locking import exclusive_lock
    from ..secret_input import read_passphrase
    from . import services, volume

    paths = request.paths
    vol = load_volume_config(paths.volume_ini, root_owned=paths.root_owned)
    config = load_json_config(FrontendConfig, paths.api_config, root_owned=paths.root_owned, missing_ok=True)
    if volume.current_status(vol).mounted:
        return _status_report(paths)  # nothing to do, and no passphrase needed
    # Read before locking: a caller slow to send (or close) stdin must not hold up a close.
    passphrase = read_passphrase(request.stdin, request.stdin_is_tty)
    with exclusive_lock(paths.lock_file, timeout=_service_lock_wait(config), what="luksctl open or close"):
        if volume.current_status(vol).mounted:
            return _status_report(paths)  # another open finished while we read
        outcome = volume.open_volume(vol, passphrase, config.MOUNT_OPTIONS)
        results = services.run_post_open_actions(config)
    status = outcome.status
    return Report(status.state.value, status.mapper_open, status.mounted, outcome.changed, [asdict(r) for r in results])


def cmd_close(request: Request) -> Report:
    from ..locking import exclusive_lock
    from . import volume

    paths = request.paths
    vol = load_volume_config(paths.volume_ini, root_owned=paths.root_owned)
    with exclusive_lock(paths.lock_file, timeout=LOCK_WAIT, what="luksctl open or close"):
        outcome = volume.close_volume(vol)
    return Report(outcome.status.state.value, outcome.status.mapper_open, outcome.status.mounted, outcome.changed)


def cmd_nfs_mount(request: Request) -> Report:
    from ..locking import exclusive_lock
    from . import services

    paths = request.paths
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


def cmd_lifecycle(request: Request) -> Report:
    """report, header, recovery-key, rotate, decommission: lifecycle.py's handlers, told in the volume's state."""
    from . import lifecycle

    paths = request.paths
    context = lifecycle.Context(paths.volume_ini, paths.lock_file, LOCK_WAIT, paths.root_owned, request.stdin, request.stdin_is_tty)
    outcome = lifecycle.run(request.args, context)
    report = _state_after_error(paths)  # the volume's state, or "unavailable" once it is gone
    report.changed, report.details, report.text, report.exit_code = outcome.changed, outcome.details, outcome.text, outcome.exit_code
    return report


def setup_handler(build_options: Callable) -> Handler:
    """`luksctl setup` and `fastluks`: build_options(args, stdin) reads the passphrase and the
    token (before the setup lock) and returns the SetupOptions; setup runs under the lock."""

    def run(request: Request) -> Report:
        from ..locking import exclusive_lock
        from .setup import Progress, run_setup

        options = build_options(request.args, request.stdin)
        request.audit.update(volume=options.device, vault_path=str(options.vault.ref) if options.vault else None)
        progress = Progress(json_lines=request.args.json)
        with exclusive_lock(SETUP_LOCK, timeout=SETUP_LOCK_WAIT, what=f"luksctl setup ({SETUP_LOCK})"):
            return _setup_report(vars(run_setup(options, progress)))

    def failed(request: Request) -> Report:
        from .setup import SetupReport

        return _setup_report(vars(SetupReport("unavailable", request.audit.get("volume", "?"))))

    def print_report(request: Request, report: Report, out) -> None:
        from . import setup_cli

        setup_cli.print_result({**report.details, "error": report.error}, request.args.json, out)

    return Handler(run, failed, print_report)


def _setup_report(result: dict) -> Report:
    report = Report(result["volume_state"], changed=result["changed"])
    report.details, report.exit_code, report.audited = result, EXIT_OK, not result["plan"]
    return report


def _setup_options(args: argparse.Namespace, stdin) -> object:
    from . import setup_cli

    return setup_cli.options_from_args(args, stdin)


_LIFECYCLE = Handler(cmd_lifecycle)
COMMANDS = {
    "status": Handler(cmd_status, audited=False),
    "open": Handler(cmd_open),
    "close": Handler(cmd_close),
    "nfs-mount": Handler(cmd_nfs_mount),
    "setup": setup_handler(_setup_options),
    "report": Handler(cmd_lifecycle, audited=False),
    "header": _LIFECYCLE,
    "recovery-key": _LIFECYCLE,
    "rotate": _LIFECYCLE,
    "reencrypt": _LIFECYCLE,
    "decommission": _LIFECYCLE,
}
CORE_COMMANDS = ("status", "open", "close", "nfs-mount")  # what sudo lets the services run


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


def _print_volume_report(request: Request, report: Report, out) -> None:
    if request.args.json:
        fields = {key: value for key, value in vars(report).items()
                  if value is not None and key not in ("details", "text", "exit_code", "audited")}
        print(json.dumps({**fields, **(report.details or {})}), file=out)
    else:
        print_text(request.args.command, report, out)


def _state_after_error(paths: Paths) -> Report:
    try:
        return _status_report(paths)
    except LuksctlError:
        return Report(VolumeState.UNAVAILABLE.value)


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise LuksctlError(f"this command must run as root (sudo {'fastluks' if action == 'fastluks' else 'luksctl'} ...)")


def run_command(handler: Handler, request: Request, action: str) -> int:
    """The one door: root check, the handler, errors to exit codes, the audit line, the answer."""
    started = time.monotonic()
    error_class = None
    try:
        if action != "status":
            _require_root(action)
        report = handler.run(request)
        if report.exit_code is not None:
            exit_code = report.exit_code
        else:
            exit_code = EXIT_OK if report.ok or action == "close" else EXIT_NOT_OPEN
        failed = [action["name"] for action in report.actions or [] if not action["ok"]]
        if failed:
            report.error = f"the volume is mounted, but these post-open actions failed: {', '.join(failed)}"
            exit_code = EXIT_ACTION_FAILED
    except LuksctlError as exc:
        _logger().error("%s", exc.detail() if isinstance(exc, CommandFailed) else exc.message)
        report = (handler.failed or (lambda request: _state_after_error(request.paths)))(request)
        report.error = exc.message
        exit_code = exc.exit_code
        error_class = exc.__class__.__name__
    except Exception as exc:  # still answer the caller (the API) in JSON, and audit
        _logger().exception("unexpected error")
        report = (handler.failed or (lambda request: _state_after_error(request.paths)))(request)
        report.error = f"internal error ({exc.__class__.__name__}); see the log"
        exit_code = EXIT_COMMAND_FAILED
        error_class = exc.__class__.__name__
    if handler.audited and (report.audited or exit_code != EXIT_OK):
        from .. import audit

        audit.use_syslog()
        audit.record(
            action=action,
            client=f"uid {os.environ.get('SUDO_UID', os.getuid())}",
            outcome="ok" if exit_code == EXIT_OK else "error",
            status=exit_code,
            duration_ms=(time.monotonic() - started) * 1000,
            error_class=error_class,
            **request.audit,
        )
    (handler.print or _print_volume_report)(request, report, sys.stdout)
    sys.stdout.flush()
    return exit_code


def main(argv: list[str] | None = None, *, paths: Paths = Paths(), stdin: io.BufferedIOBase | None = None, stdin_is_tty: bool | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = next((word for word in words if not word.startswith("-")), None)
    args = build_parser(core_only=command in CORE_COMMANDS).parse_args(argv)
    if args.command != "status":
        _logger()  # the commands that change something log what they run
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdin_is_tty = stdin_is_tty if stdin_is_tty is not None else sys.stdin.isatty()
    action = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    return run_command(COMMANDS[args.command], Request(args, paths, stdin, stdin_is_tty, {}), action)
