"""CoalescedCall across processes, as gunicorn's workers use it: one call, its result shared."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from luksctl.api.coalesce import CoalescedCall, Outcome
from luksctl.errors import ConfigError


def _call_in_a_process(directory, counter, start, results) -> None:
    def slow_call():
        with open(counter, "a") as calls:
            calls.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return {"pid": os.getpid()}

    start.wait()
    outcome = CoalescedCall(directory, "fanout", min_interval=0, wait=10).run(slow_call)
    results.put((outcome.value, outcome.shared))


def test_processes_that_arrive_together_share_one_call(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(4), context.Queue()
    counter = tmp_path / "calls"
    processes = [context.Process(target=_call_in_a_process, args=(tmp_path, counter, start, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(10)

    assert len(counter.read_text().splitlines()) == 1
    assert len({str(value) for value, _ in outcomes}) == 1
    assert sorted(shared for _, shared in outcomes) == [False, True, True, True]


def test_a_call_made_before_a_fresh_request_arrived_does_not_count(tmp_path):
    shared = CoalescedCall(tmp_path, "fanout", min_interval=60, wait=10)
    shared.run(lambda: "before")

    assert shared.run(lambda: "again").value == "before"
    assert shared.run(lambda: "after the change", fresh=True).value == "after the change"


def test_a_shared_directory_is_refused(tmp_path):
    tmp_path.chmod(0o777)

    with pytest.raises(ConfigError, match="writable by nobody else"):
        CoalescedCall(tmp_path, "fanout", min_interval=0, wait=10)


def test_no_symlink_planted_beside_the_result_is_followed(tmp_path):
    """Neither one at the result (read) nor one at the name its temporary had (written through)."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "fanout.json").symlink_to(victim)
    (tmp_path / f".fanout.json.{os.getpid()}").symlink_to(victim)  # the temporary's name was predictable

    outcome = CoalescedCall(tmp_path, "fanout", min_interval=60, wait=10).run(lambda: {"fresh": True})

    assert outcome == Outcome({"fresh": True}, shared=False)
    assert victim.read_text() == "untouched" and not (tmp_path / "fanout.json").is_symlink()
