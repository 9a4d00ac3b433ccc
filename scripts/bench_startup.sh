#!/usr/bin/env bash
# Start-up of the root CLI (issue 11): the whole process `luksctl --json status` against
# `python3 -I -c pass`, natively, with hyperfine (median of STARTUP_RUNS, default 30).
#
#   scripts/bench_startup.sh [LUKSCTL [OUT_DIR]]    defaults: .venv/bin/luksctl, vm-out
#
# luksctl takes no path from its caller: it reads /etc/luks/luks-cryptdev.ini. So the runs
# happen in a private mount namespace where /etc is an overlay holding deploy/config's sample
# ini; the host's /etc is never written. Needs root (unshare, mount), as make bench does.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=/usr/bin/python3

if [[ ${1:-} != --in-namespace ]]; then
    luksctl=$(realpath "${1:-$repo/.venv/bin/luksctl}")
    out=$(realpath -m "${2:-$repo/vm-out}")
    mkdir -p "$out"
    scratch=$(mktemp -d)
    trap 'rmdir "$scratch"' EXIT
    unshare --mount --propagation private "$0" --in-namespace "$luksctl" "$out" "$scratch"
    exit
fi
luksctl=$2 out=$3 scratch=$4

# An overlay's upper layer cannot sit on the container's own overlay root: use a tmpfs.
mount -t tmpfs tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$scratch/upper,workdir=$scratch/work" /etc
install -d -m 0755 -o root -g root /etc/luks
install -m 0644 -o root -g root "$repo/deploy/config/luks-cryptdev.ini" /etc/luks/luks-cryptdev.ini

# The host has no device-mapper: the volume is "unmounted" (exit 1). Anything else, such as a
# config error, would time the wrong path.
answer=$("$luksctl" --json status) || [[ $? == 1 ]]
[[ $answer == *'"volume_state": "unmounted"'* && $answer != *'"error"'* ]] \
    || { echo "bench_startup: unexpected answer from $luksctl: $answer" >&2; exit 1; }

hyperfine --shell=none --warmup 5 --runs "${STARTUP_RUNS:-30}" --ignore-failure \
    --export-json "$out/bench_startup.json" \
    --command-name "python3 -I -c pass" "$python -I -c pass" \
    --command-name "luksctl --json status" "$luksctl --json status"

"$python" - "$out/bench_startup.json" <<'PY'
import json, sys
base, cli = json.load(open(sys.argv[1]))["results"]
def cpu(result):  # less disturbed than wall time when other jobs share the cores
    return result["user"] + result["system"]
print(f"median wall: {base['command']} {base['median'] * 1000:.1f} ms, {cli['command']} {cli['median'] * 1000:.1f} ms, "
      f"ratio {cli['median'] / base['median']:.2f} x (goal <= 3 x)")
print(f"mean CPU (user + system): {cpu(base) * 1000:.1f} ms and {cpu(cli) * 1000:.1f} ms, ratio {cpu(cli) / cpu(base):.2f} x")
PY
