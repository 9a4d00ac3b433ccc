"""The leak watch (leaks.py) on the VM's Debian kernel: a secret on the argv of a process that
lives about a millisecond is caught every time, as is one split across arguments or across the
pieces the kernel logs a long argument in. A /proc sampler caught such a canary 5 times in 20."""

from __future__ import annotations

import secrets
import subprocess

from leaks import watch_for_leaks


def test_the_leak_watch_catches_every_canary_on_an_argv():
    canaries = {f"canary {n}": secrets.token_hex(16).encode() for n in range(20)}
    halves = (secrets.token_hex(8), secrets.token_hex(8))
    in_a_long_argument = secrets.token_hex(16)
    needles = {**canaries, "split": "".join(halves).encode(), "long": in_a_long_argument.encode()}
    with watch_for_leaks(needles) as watch:
        for secret in canaries.values():
            subprocess.run(["/bin/true", "--passphrase", secret.decode()], check=True)  # exits at once
        subprocess.run(["/bin/true", *halves], check=True)
        # Logged in pieces of under 7.5 kB (a1_len, a1[0], a1[1]...): the secret straddles the first boundary.
        subprocess.run(["/bin/true", "x" * 3700 + in_a_long_argument + "x" * 20000], check=True)
    assert sorted({name for name, _, _ in watch.argv_hits()}) == sorted(needles)
    assert watch.execs.lost == 0


def test_the_leak_watch_catches_every_canary_in_an_environment():
    """Each in the environment of a process that lives about a millisecond: 20 alone, one across
    the probe's 64-byte chunks, one at the end of a 20 kB environment."""
    canaries = {f"canary {n}": secrets.token_hex(16).encode() for n in range(20)}
    across_chunks, at_the_end = secrets.token_hex(16), secrets.token_hex(16)
    needles = {**canaries, "across chunks": across_chunks.encode(), "at the end": at_the_end.encode()}
    with watch_for_leaks(needles) as watch:
        for secret in canaries.values():
            subprocess.run(["/bin/true"], env={"VAULT_TOKEN": secret.decode()}, check=True)
        subprocess.run(["/bin/true"], env={"PADDING": "x" * 50, "SECRET": across_chunks}, check=True)
        subprocess.run(["/bin/true"], env={"PADDING": "x" * 20000, "SECRET": at_the_end}, check=True)
    assert sorted({name for name, _ in watch.environ_hits()}) == sorted(needles)
    assert watch.environments.lost == 0
