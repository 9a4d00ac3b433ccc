#!/usr/bin/env bash
# Installs the Debian packages that the tests, the VM harness and the demo need, only when missing.
set -euo pipefail
packages=(
    python3 python3-venv            # the venvs are built from Debian's interpreter (see README, Testing)
    cryptsetup-bin e2fsprogs util-linux sudo kmod iproute2
    nfs-kernel-server nfs-common rpcbind
    strace                          # VM tests: rotate SIGKILLed on entry to each of its file operations
    qemu-system-x86 linux-image-amd64 busybox-static
    nginx                           # the proxy in front of gunicorn (deploy/luksctl-proxy@.service)
    wrk                             # make bench: HTTP load from inside the VM
    hyperfine                       # make bench: the root CLI's start-up against a bare interpreter, natively
    prometheus prometheus-node-exporter  # promtool (the alert rules' tests); tests/vm/test_metrics.py's scraper and node exporter
    auditd python3-audit            # tests/support/execlog.py: every exec's argv, recorded by the kernel's audit
    bpftrace                        # tests/support/envlog.py: every exec's environment, copied by a probe as it starts
    fdisk                           # sfdisk: scripts/vm-powercut.sh partitions the persistent disk
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
ls /boot/vmlinuz-* >/dev/null
