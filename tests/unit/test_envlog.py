"""The environment recorder's decoding (tests/support/envlog.py) of bpftrace's output; the probe
itself runs on the VM's kernel (tests/vm/test_leak_recorder.py): this host's has no tracefs."""

from support.envlog import CHUNK, ENV_LIMIT, ExecEnvironment, parse


def printed(data: bytes) -> bytes:
    """As bpftrace's %rx prints a buffer."""
    return b"".join(b"\\x%02x" % byte for byte in data)


def probe_output(pid: int, exec_time: int, environ: bytes, program: bytes = b"true") -> list[bytes]:
    """The lines the probe prints for one exec, chunked as it chunks (the last chunk ends at the end)."""
    lines = [b"E %d %d %d %s" % (pid, exec_time, len(environ), program)]
    for offset in range(0, min(len(environ), ENV_LIMIT), CHUNK):
        at = len(environ) - CHUNK if offset + CHUNK > len(environ) else offset
        before = b"ARGV\x00" * CHUNK  # what lies before env_start: the arguments
        window = (before + environ + b"\x00" * CHUNK)[len(before) + at:len(before) + at + CHUNK]
        lines.append(b"C %d %d %d %s" % (pid, exec_time, at, printed(window)))
    return lines


def test_each_exec_gets_its_whole_environment_back_whatever_its_size_and_bytes():
    long = b"PADDING=" + b"x" * 1000 + b"\x00SECRET=" + bytes(range(1, 256)) + b"\x00"
    short = b"A=1\x00"
    exact = b"B=" + b"y" * (CHUNK - 3) + b"\x00"
    output = [b"Attaching 1 probe...", *probe_output(10, 1, long), *probe_output(11, 2, short, b"cryptsetup"),
              *probe_output(10, 3, exact, b"luksctl")]
    output.insert(4, b"an unrelated line")

    recorded = parse(b"\n".join(output) + b"\n")

    assert sorted(recorded.environments) == sorted([ExecEnvironment(10, b"true", long), ExecEnvironment(11, b"cryptsetup", short),
                                                    ExecEnvironment(10, b"luksctl", exact)])
    assert (recorded.lost, recorded.too_large, recorded.unreadable) == (0, 0, 0)


def test_lost_events_an_environment_over_the_limit_and_an_unreadable_chunk_are_counted():
    huge = b"H=" + b"z" * ENV_LIMIT + b"\x00"
    unread = probe_output(13, 2, b"A=" + b"b" * 200 + b"\x00")
    unread[2] = b"C 13 2 64 " + b"\\x00" * CHUNK  # a read that failed: bpftrace's zeros
    output = [*probe_output(12, 1, huge), b"Lost 3 events", *unread, b"Lost 2 events"]

    recorded = parse(b"\n".join(output))

    assert recorded.environments[0] == ExecEnvironment(12, b"true", huge[:ENV_LIMIT])
    assert (recorded.lost, recorded.too_large, recorded.unreadable) == (5, 1, 1)
