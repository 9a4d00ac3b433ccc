#!/usr/bin/env bash
# Boots one virtme-ng VM (a real kernel: dm-crypt, loop, NFS) over the host's filesystem and
# runs MODE inside it via scripts/vm/guest.sh. The guest's exit status becomes ours.
# test-systemd boots with systemd as PID 1 instead of virtme's own init.
# VM_DISK=FILE attaches FILE as a virtio-blk disk, /dev/vda in the guest (scripts/vm-powercut.sh).
# VM_CPUS: the guest's vCPUs (2; scripts/vm-test.sh gives two VMs side by side one each).
# usage: VM_PREFIX=/opt/luksctl-test scripts/vm-run.sh test|test-systemd|demo|bench|powercut-before|powercut-after [args...]
set -euo pipefail
mode=${1:?usage: $0 test|test-systemd|demo|bench|powercut-before|powercut-after [args...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)

# The guest's root is this host's /. In a Docker container /.dockerenv is in it, and systemd
# then takes the VM for a container: it ignores the kernel command line and starts no serial
# console, so virtme's init (which runs our script) never starts. So systemd boots from a view
# of / without that file: an overlay in a mount namespace of our own, gone when we exit.
if [[ $mode == test-systemd && -e /.dockerenv && -z ${VM_RUN_ROOT_VIEW:-} ]]; then
    VM_RUN_ROOT_VIEW=$(mktemp -d /tmp/vm-root-view.XXXXXX)
    export VM_RUN_ROOT_VIEW
    trap 'rmdir "$VM_RUN_ROOT_VIEW"' EXIT
    set +e
    unshare --mount --propagation private "$0" "$mode" "$@"
    exit
fi
prefix=${VM_PREFIX:-/opt/luksctl-test}
out=${VM_OUT:-$repo/vm-out} # the only directory the guest can write back to (--rwdir)
rm -rf "$out"
mkdir -p "$out"

[[ -x $prefix/venv/bin/python ]] || { echo "vm-run: no venv in $prefix; run scripts/build-vm-prefix.sh" >&2; exit 2; }
kernel=$(ls -v /boot/vmlinuz-* | tail -n 1)
# vng calls virtme-run from its own venv, so that bin directory must be on PATH.
export PATH=$repo/.venv/bin:$PATH
# vng hands --exec to the guest's shell: quote every argument for it.
guest_cmd=$(printf '%q ' "$repo/scripts/vm/guest.sh" "$mode" "$out" "$prefix" "$@")

root_args=() rwdir=$out systemd_args=() disk_args=()
[[ -z ${VM_DISK:-} ]] || disk_args=(--disk "$VM_DISK")
if [[ $mode == test-systemd ]]; then
    systemd_args=(--systemd)
    if [[ -n ${VM_RUN_ROOT_VIEW:-} ]]; then
        view=$VM_RUN_ROOT_VIEW
        mount -t tmpfs vm-root-view "$view"
        mkdir "$view/upper" "$view/work" "$view/root"
        mount -t overlay vm-root-view -o "lowerdir=/,upperdir=$view/upper,workdir=$view/work" "$view/root"
        rm "$view/root/.dockerenv"
        root_args=(--root "$view/root")
        rwdir="$out=$out" # guest=host: a bare path would be taken relative to --root
    fi
fi

start=$SECONDS
# --disable-kvm: /dev/kvm exists on these hosts, but the stock kernel hangs under it.
# </dev/null: vng must not wait on, or steal, a CI job's stdin.
# 2>&1 | cat: qemu reopens its stdout and stderr; were they a file, it would write from
# offset 0 and clobber (or be clobbered by) the lines before it. A pipe has no offset.
set +e
vng "${root_args[@]}" --disable-kvm --force-9p -r "$kernel" --memory 2G --cpus "${VM_CPUS:-2}" --rwdir "$rwdir" \
    "${systemd_args[@]}" "${disk_args[@]}" --exec "$guest_cmd" </dev/null 2>&1 | cat
rc=${PIPESTATUS[0]}
set -e
echo "vm-run: $mode exited $rc after $((SECONDS - start)) s (kernel $kernel)"

# The console interleaves kernel messages: repeat pytest's outcome, and on failure
# which test failed and why, so they are the last lines a CI log shows.
if [[ -f $out/pytest.log ]]; then
    echo "===== pytest summary ($out/pytest.log) ====="
    if ((rc != 0)) && grep -q 'short test summary info' "$out/pytest.log"; then
        sed -n '/short test summary info/,$p' "$out/pytest.log"
    elif ((rc != 0)); then
        tail -n 5 "$out/pytest.log"
    else
        tail -n 1 "$out/pytest.log"
    fi
fi
if ((rc != 0)); then
    for log in "$out"/*.log; do
        [[ -f $log && $log != "$out/pytest.log" ]] || continue
        echo "===== tail of $log ====="
        tail -n 25 "$log"
    done
fi
exit "$rc"
