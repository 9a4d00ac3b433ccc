"""runner.py with real processes: argv lists, fixed environment, timeouts, stdin only."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from luksctl import runner
from luksctl.errors import CommandFailed


def test_success_returns_exit_code_zero_and_absolute_argv0():
    result = runner.run(["true"], timeout=10)

    assert result.returncode == 0
    assert os.path.isabs(result.argv[0]) and os.path.basename(result.argv[0]) == "true"


def test_stdin_bytes_reach_the_process_unchanged():
    data = b"pass phrase \\ \xc3\xbc\nsecond line\n"

    result = runner.run(["cat"], stdin=data, timeout=10)

    assert result.stdout.encode() == data


def test_stdin_defaults_to_empty_not_the_callers_terminal():
    result = runner.run(["cat"], timeout=10)

    assert result.stdout == ""


def test_environment_is_exactly_safe_path_and_lc_all_c(monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "s.leak")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")

    result = runner.run(["env"], timeout=10)

    assert sorted(result.stdout.splitlines()) == sorted([f"PATH={runner.SAFE_PATH}", "LC_ALL=C"])


def test_binaries_are_found_on_safe_path_not_the_callers_path(tmp_path, monkeypatch):
    impostor = tmp_path / "true"
    impostor.write_text("#!/bin/sh\nexit 42\n")
    impostor.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    result = runner.run(["true"], timeout=10)

    assert result.returncode == 0
    assert not result.argv[0].startswith(str(tmp_path))


def test_nonzero_exit_raises_command_failed_with_argv_code_and_stderr():
    with pytest.raises(CommandFailed) as caught:
        runner.run(["sh", "-c", "echo oops >&2; exit 3", "arg0"], timeout=10)

    error = caught.value
    assert error.returncode == 3
    assert error.stderr == "oops\n"
    assert error.argv[1:] == ["-c", "echo oops >&2; exit 3", "arg0"]
    assert os.path.basename(error.argv[0]) == "sh"
    assert "exit=3" in error.detail() and "oops" in error.detail()


def test_check_false_returns_the_failure_to_the_caller():
    result = runner.run(["sh", "-c", "echo out; echo err >&2; exit 5"], timeout=10, check=False)

    assert (result.returncode, result.stdout, result.stderr) == (5, "out\n", "err\n")


def test_timeout_raises_command_failed_without_exit_code():
    started = time.monotonic()

    with pytest.raises(CommandFailed) as caught:
        runner.run(["sleep", "30"], timeout=0.3)

    assert caught.value.returncode is None
    assert caught.value.argv[1:] == ["30"]
    assert time.monotonic() - started < 10


def test_missing_binary_raises_command_failed():
    with pytest.raises(CommandFailed) as caught:
        runner.run(["luksctl-no-such-binary"], timeout=10)

    assert caught.value.returncode is None
    assert "luksctl-no-such-binary" in caught.value.message


def test_missing_absolute_binary_raises_command_failed():
    with pytest.raises(CommandFailed) as caught:
        runner.run(["/nonexistent/bin/tool"], timeout=10)

    assert caught.value.returncode is None
    assert caught.value.argv == ["/nonexistent/bin/tool"]


def test_streaming_hands_over_each_line_as_it_comes_and_keeps_stderr():
    seen = []
    script = "read secret; echo \"one $secret\"; sleep 0.3; printf 'two'; echo oops >&2; exit 3"

    result = runner.run_streaming(["sh", "-c", script], stdin=b"s3cret\n", timeout=10, on_line=lambda line: seen.append((line, time.monotonic())))

    assert [line for line, _ in seen] == ["one s3cret", "two"], "a last line without its newline too"
    assert seen[1][1] - seen[0][1] >= 0.25, "the first line came before the command ended"
    assert result.returncode == 3 and result.stderr == "oops\n"


def test_streaming_without_a_line_reader_leaves_stdout_to_the_command(capfd):
    result = runner.run_streaming(["sh", "-c", "echo progress bar; echo err >&2"], stdin=b"", timeout=10, on_line=None)

    assert capfd.readouterr().out == "progress bar\n" and result.stderr == "err\n"


def test_streaming_is_killed_at_its_deadline():
    started = time.monotonic()

    with pytest.raises(CommandFailed, match="did not finish within 0.5 s") as failed:
        runner.run_streaming(["sh", "-c", "echo started >&2; exec sleep 30"], stdin=b"", timeout=0.5, on_line=lambda line: None)

    assert time.monotonic() - started < 5 and failed.value.returncode is None



def streaming(argv, **kwargs) -> runner.Result:
    """run_streaming with its lines as the Result's stdout, as run() has it."""
    lines: list[str] = []
    result = runner.run_streaming(argv, stdin=b"", on_line=lines.append, **kwargs)
    return dataclasses.replace(result, stdout="".join(f"{line}\n" for line in lines))


@pytest.mark.parametrize("run", [runner.run, streaming], ids=["run", "run_streaming"])
def test_both_ways_give_the_same_environment_and_the_same_start_failure(run, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "s.leak")

    result = run(["env"], timeout=10)
    with pytest.raises(CommandFailed) as caught:
        run(["/nonexistent/bin/tool"], timeout=10)

    assert sorted(result.stdout.splitlines()) == sorted([f"PATH={runner.SAFE_PATH}", "LC_ALL=C"])
    assert caught.value.message == "/nonexistent/bin/tool could not be started: No such file or directory"
    assert (caught.value.returncode, caught.value.argv) == (None, ["/nonexistent/bin/tool"])
