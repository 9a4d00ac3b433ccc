"""Figures from wrk's text output (`wrk --latency`), shared by the benchmarks."""

from __future__ import annotations

import math
import re

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * _UNIT_MS[unit]


def parse(out: str) -> dict:
    """Requests, req/s, failures (non-2xx and socket errors) and latency percentiles in ms.

    A percentile wrk did not print (no request completed) is NaN. wrk pads values in seconds
    with a trailing space ("1.50s ").
    """
    latency = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.MULTILINE)}
    sockets = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    found = re.search(r"Socket errors: (.*)$", out, re.MULTILINE)
    if found:
        sockets.update({k: int(v) for k, v in re.findall(r"(\w+) (\d+)", found.group(1))})
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result = {
        "requests": int(total.group(1)) if total else 0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sockets,
        **{f"p{p}_ms": latency.get(p, math.nan) for p in ("50", "75", "90", "99")},
    }
    result["failed_requests"] = result["non_2xx"] + sum(sockets.values())
    # Printed by scripts/wrk_steady.lua: responses after the warm-up, when every connection is open.
    steady = re.search(r"Steady requests: (\d+) in ([\d.]+)s", out)
    if steady:
        count, seconds = int(steady.group(1)), float(steady.group(2))
        result["steady_rps"] = count / seconds if seconds else 0.0
    return result
