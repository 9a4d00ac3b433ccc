#!/usr/bin/env bash
# The power-cut pair (issue 22): two boots over one persistent virtual disk. Boot 1
# (tests/vm/powercut/before_the_cut.py) starts an online `luksctl reencrypt` there and hard-resets
# the VM mid-way with sysrq b (no sync); boot 2 (tests/vm/powercut/test_after_the_cut.py) opens the
# volume by the dashboard's flow and resumes. Boot 1 has no exit status worth keeping: it ends in
# the reset, and boot 2 fails if boot 1 did not reach the cut.
# usage: VM_PREFIX=... VM_OUT=DIR scripts/vm-powercut.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${VM_OUT:?VM_OUT names the results directory}
disk=$(mktemp /tmp/luksctl-powercut.XXXXXX.img)
trap 'rm -f "$disk"' EXIT
# 48 MiB for /etc/luks (a LUKS2 header backup is 16 MiB, and luksctl writes it beside the old
# one before the rename) and the notes; the rest (at GPT's alignment) for the LUKS volume, enough
# data that the re-encryption is still running seconds after it starts, under emulation.
truncate -s 160M "$disk"
sfdisk --quiet "$disk" <<'LAYOUT'
label: gpt
size=48MiB, name=state
name=luks
LAYOUT
VM_DISK=$disk VM_OUT=$out/before "$repo/scripts/vm-run.sh" powercut-before || true
VM_DISK=$disk VM_OUT=$out/after "$repo/scripts/vm-run.sh" powercut-after
