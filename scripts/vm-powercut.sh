#!/usr/bin/env bash
# The power-cut pair (issues 21 and 22): two boots over one persistent virtual disk. Boot 1
# (tests/vm/powercut/before_the_cut.py) stops a setup or a rotation at each of their steps, one
# volume each, starts an online `luksctl reencrypt` of one more and hard-resets the VM mid-way with
# sysrq b (no sync); boot 2 (tests/vm/powercut/test_after_the_cut.py) runs each command again and
# opens each volume by the dashboard's flow. Boot 1 has no exit status worth keeping: it ends in
# the reset, and boot 2 fails if boot 1 did not reach the cut.
# usage: VM_PREFIX=... VM_OUT=DIR scripts/vm-powercut.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${VM_OUT:?VM_OUT names the results directory}
disk=$(mktemp /tmp/luksctl-powercut.XXXXXX.img)
trap 'rm -f "$disk"' EXIT
# 512 MiB for OpenBao's storage, the notes and an /etc/luks for each volume (a LUKS2 header
# backup is 16 MiB, and a rotation writes the new one beside it, from a scratch copy); 110 MiB for
# the re-encrypted volume, enough data that it is still running seconds after it starts, under
# emulation; 40 MiB for each cut point's volume (tests/vm/powercut/persistent_disk.py, CUT_POINTS).
truncate -s 1200M "$disk"
{
    echo "label: gpt"
    echo "size=512MiB, name=state"
    echo "size=110MiB, name=reencrypted"
    for point in $(seq -w 1 13); do echo "size=40MiB, name=cut$point"; done
} | sfdisk --quiet "$disk"
VM_DISK=$disk VM_OUT=$out/before "$repo/scripts/vm-run.sh" powercut-before || true
VM_DISK=$disk VM_OUT=$out/after "$repo/scripts/vm-run.sh" powercut-after
