#!/usr/bin/env bash
# `make test-vm`: every boot. The systemd boot (tests/vm/systemd) runs beside the main boot, and
# the power-cut pair starts on whichever of their cores frees first; each VM has one vCPU. One VM
# with two vCPUs kept 66-88 % of this machine's two cores busy (sampled from /proc/stat during the
# systemd boot), and two such VMs side by side (four vCPU threads on two cores) slowed the main
# boot's first tests threefold; one vCPU each keeps each VM on a core of its own. The systemd
# boot's and the pair's consoles go to files, since consoles interleaved cannot be read; their
# outcomes are printed at the end. Every boot runs to its end; the exit status is non-zero if any
# failed. HOST_TESTS, if set, is a command (`make test` gives the host suites) run once the systemd
# boot has started, on the core the main boot does not have yet. The two cores' paths (host suites
# then main boot; systemd boot then pair) ended 81 s apart in make test on 2026-12-06 (README).
# usage: VM_PREFIX=... PYTHON=... [HOST_TESTS=...] scripts/vm-test.sh [pytest args for the main boot...]
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${VM_PREFIX:?VM_PREFIX names the VM prefix}
python=${PYTHON:?PYTHON names the guest interpreter}
export VM_PREFIX VM_CPUS=1

# The systemd boot installs with deploy/install.sh from a wheelhouse (the guest has no network);
# the Ansible role installs from it too, plus the luksctl wheel it copies to nodes (PREFIX/dist).
"$repo/scripts/build-wheelhouse.sh" "$prefix/wheelhouse" "$python" || exit
rm -rf "$prefix/dist" && "$repo/.venv/bin/pip" wheel --quiet --no-deps -w "$prefix/dist" "$repo" || exit

console=$repo/vm-out-systemd.console.log
rm -rf "$repo/vm-out-systemd"  # its pytest.log, below, must be this run's
VM_OUT=$repo/vm-out-systemd "$repo/scripts/vm-run.sh" test-systemd >"$console" 2>&1 &
systemd_boot=$!
host=0
if [[ -n ${HOST_TESTS:-} ]]; then
    eval "$HOST_TESTS"
    host=$?
fi
# The main boot starts once the systemd boot's tests have: started at the same moment, the
# systemd guest printed nothing in 15 minutes (alone it reaches pytest in about 3).
waited=0
while [[ ! -e $repo/vm-out-systemd/pytest.log ]] && kill -0 "$systemd_boot" 2>/dev/null && ((waited < 900)); do
    sleep 5
    ((waited += 5))
done
"$repo/scripts/vm-run.sh" test "$@" &
main_boot=$!
# Whichever of the two ends first leaves its core to the pair; bash keeps the other's status.
# (wait -n skips a job that ended before it was called, hence the check.)
if kill -0 "$systemd_boot" 2>/dev/null; then
    wait -n -p ended "$main_boot" "$systemd_boot"
    first=$?
else
    ended=$systemd_boot
    wait "$systemd_boot"
    first=$?
fi
powercut_console=$repo/vm-out-powercut.console.log
VM_OUT=$repo/vm-out-powercut "$repo/scripts/vm-powercut.sh" >"$powercut_console" 2>&1
powercut=$?
if [[ $ended == "$main_boot" ]]; then
    main=$first
    wait "$systemd_boot"
    systemd=$?
else
    systemd=$first
    wait "$main_boot"
    main=$?
fi
echo "===== the systemd boot, from its console ($console) ====="
sed -n '/^vm-run: test-systemd exited/,$p' "$console"
echo "===== the power-cut pair, from its console ($powercut_console) ====="
grep '^vm-run: powercut-before exited' "$powercut_console"
sed -n '/^vm-run: powercut-after exited/,$p' "$powercut_console"
((powercut == 0)) || tail -n 30 "$powercut_console"
echo "vm-test: host suites exited $host, main boot $main, power-cut pair $powercut, systemd boot $systemd"
((host == 0 && main == 0 && powercut == 0 && systemd == 0))
