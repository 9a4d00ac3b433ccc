"""The exec-time recorder (tests/support/execlog.py) on this host's kernel: it catches what a
/proc sampler misses (a secret on the argv of a process that lives about a millisecond) and
fails a recording it cannot vouch for."""

import os
import secrets
import signal
import subprocess
import threading

import pytest

from support.execlog import ExecRecorder, audit_every_new_process, audit_status, auditctl


def canary(argv: list[str]) -> None:
    subprocess.run(argv, check=True)


def test_a_secret_on_the_argv_of_a_one_millisecond_process_is_caught_20_times_in_20():
    planted = {f"canary {n}": secrets.token_hex(16).encode() for n in range(20)}
    with ExecRecorder() as recorder:
        for secret in planted.values():
            canary(["/bin/true", "--passphrase", secret.decode()])  # exits at once: ~1 ms
    assert sorted(name for name, _, _ in recorder.hits(planted)) == sorted(planted)
    assert recorder.lost == 0


def test_a_secret_split_across_arguments_or_across_the_pieces_of_a_long_one_is_caught():
    halves = (secrets.token_hex(8), secrets.token_hex(8))
    long_one = secrets.token_hex(16)
    # The kernel logs an argument this long in pieces of under 7.5 kB (a1_len, a1[0], a1[1]...):
    # the secret straddles the first boundary.
    padding = "x" * 3700
    with ExecRecorder() as recorder:
        canary(["/bin/true", halves[0], halves[1]])
        canary(["/bin/true", padding + long_one + "x" * 20000])
    hits = recorder.hits({"split": "".join(halves).encode(), "long": long_one.encode()})
    assert sorted(name for name, _, _ in hits) == ["long", "split"]


def test_arguments_that_are_not_utf_8_are_recorded_byte_exact():
    """A process may take any bytes on its argv (the VM's tests start some): the recording keeps them."""
    argv = [b"/bin/true", b"\xff\xfe not utf-8", b"", b"plain", b"with space"]
    with ExecRecorder() as recorder:
        child = subprocess.Popen(argv)
        child.wait()
    assert (child.pid, argv) in recorder.execs


def test_the_recording_says_which_process_ran_with_which_argv():
    with ExecRecorder() as recorder:
        child = subprocess.Popen(["/bin/true", "marker-argv"])
        child.wait()
    assert (child.pid, [b"/bin/true", b"marker-argv"]) in recorder.execs


def test_a_process_started_before_the_recording_is_recorded_when_it_execs_during_it():
    audit_every_new_process()
    secret = secrets.token_hex(16)
    older = subprocess.Popen(["/bin/sh", "-c", f"read go; exec /bin/true {secret}"], stdin=subprocess.PIPE)
    with ExecRecorder() as recorder:
        older.communicate(b"go\n")
    assert recorder.hits({"secret": secret.encode()}) == [("secret", older.pid, [b"/bin/true", secret.encode()])]


def test_the_audit_rules_and_settings_are_gone_afterwards_even_when_the_block_fails():
    before = audit_status()
    with pytest.raises(RuntimeError, match="the block failed"), ExecRecorder():
        raise RuntimeError("the block failed")
    rules = subprocess.run(["auditctl", "-l"], capture_output=True, text=True, check=True).stdout
    assert "luksctl-leak" not in rules
    after = audit_status()
    assert after["pid"] == 0
    settings = ("enabled", "failure", "backlog_limit", "backlog_wait_time")
    assert {k: after[k] for k in settings} == {k: before[k] for k in settings}


def test_a_recording_that_lost_a_record_fails():
    # auditd paused, a queue of 2 and no waiting: the kernel drops records, and counts them.
    with pytest.raises(AssertionError, match="the kernel lost [0-9]+ audit records"), ExecRecorder() as recorder:
        os.kill(recorder.daemon.pid, signal.SIGSTOP)
        try:
            auditctl("-b", "2", "--backlog_wait_time", "0")
            for _ in range(20):
                canary(["/bin/true"])
        finally:
            os.kill(recorder.daemon.pid, signal.SIGCONT)
    assert audit_status()["backlog_wait_time"] == recorder.before["backlog_wait_time"]


def test_a_recording_that_stopped_recording_fails():
    # The rules deleted behind its back: the canary it execs before stopping goes unrecorded.
    with pytest.raises(AssertionError, match="missed its own canary execs"), ExecRecorder():
        auditctl("-D")
    assert "luksctl-leak" not in subprocess.run(["auditctl", "-l"], capture_output=True, text=True, check=True).stdout


def test_the_recording_holds_what_ran_and_not_the_recorders_own_execs():
    with ExecRecorder() as recorder:
        pass
    assert all(b"execlog-canary" not in b"".join(run.argv) for run in recorder.execs)
    assert len(recorder.canaries) == 2 and not recorder.canaries_missed


def test_a_second_recorder_waits_for_the_first_to_stop():
    first, second = ExecRecorder(), ExecRecorder()
    first.start()
    waiting = threading.Thread(target=second.start)
    try:
        waiting.start()
        waiting.join(2)
        assert waiting.is_alive() and audit_status()["pid"] == first.daemon.pid
    finally:
        first.stop()
    waiting.join(30)
    try:
        assert audit_status()["pid"] == second.daemon.pid
    finally:
        second.stop()
    first.check()
    second.check()
