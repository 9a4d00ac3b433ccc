#!/usr/bin/env python3
"""`make mutants`' score: killed / (total - equivalent), per module and overall.

Reads `mutmut results --all true` on stdin ("    <mutant>: <status>" lines). A mutant counts
as equivalent when the survivors file names it in a row whose reason starts with
"equivalent"; a timeout counts as killed (the mutant made the tests hang, which they report).
Arguments: the survivors file, then the modules to score (src/... paths; none = all).
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

SURVIVOR_ROW = re.compile(r"^\|\s*`(?P<mutant>[^`]+)`\s*\|\s*(?P<reason>[^|]*)\|")
KILLED = {"killed", "timeout"}


def module_of(mutant: str) -> str:
    """luksctl.root.rotate.x_rotate__mutmut_3 -> luksctl.root.rotate"""
    return mutant.rsplit(".", 1)[0]


def equivalents(survivors: Path) -> set[str]:
    rows = (SURVIVOR_ROW.match(line) for line in survivors.read_text().splitlines()) if survivors.exists() else ()
    return {row["mutant"] for row in rows if row and row["reason"].strip().lower().startswith("equivalent")}


def main(argv: list[str]) -> int:
    survivors, modules = Path(argv[0]), {path.removeprefix("src/").removesuffix(".py").replace("/", ".") for path in argv[1:]}
    equivalent = equivalents(survivors)
    counts: dict[str, Counter] = defaultdict(Counter)
    for line in sys.stdin:
        mutant, _, status = line.strip().rpartition(": ")
        if mutant and (not modules or module_of(mutant) in modules):
            counts[module_of(mutant)][status] += 1
            if status == "survived" and mutant in equivalent:
                counts[module_of(mutant)]["equivalent"] += 1
    total = Counter()
    for module in sorted(counts):
        total.update(counts[module])
        print(line_for(module, counts[module]))
    print(line_for("all", total))
    return 0


def line_for(name: str, counts: Counter) -> str:
    tested = sum(n for status, n in counts.items() if status not in {"not checked", "equivalent"})
    killed = sum(counts[status] for status in KILLED)
    scored = tested - counts["equivalent"]
    score = f"{100 * killed / scored:.1f} %" if scored else "-"
    rest = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()) if status not in KILLED | {"equivalent"})
    return f"{name}: {score} killed ({killed} / ({tested} - {counts['equivalent']} equivalent)); {rest}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
