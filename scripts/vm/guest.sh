#!/usr/bin/env bash
# Runs inside the virtme-ng guest (as root, started by scripts/vm-run.sh).
# usage: guest.sh MODE OUT PREFIX [args...]
# Does the setup every mode needs, then runs the mode. Its exit status is the VM's.
set -euo pipefail
mode=$1 out=$2 prefix=$3
shift 3
repo=$(cd "$(dirname "$0")/../.." && pwd)
# The guest's default PATH lacks /usr/local/*; HOME=/root is read-only in the guest.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
# The repo is on the read-only 9p root: no .pyc files; results go to the --rwdir.
export PYTHONDONTWRITEBYTECODE=1 LUKSCTL_VM_OUT=$out

# pam_nologin would make sudo fail for every non-root user.
rm -f /run/nologin
modprobe -a loop dm-crypt veth nfsd nfs nfsv4

# The production layout (see deploy/), pointing at the venv built by build-vm-prefix.sh.
# /opt and /usr are throw-away overlays; refuse to shadow a real install the host might have.
[[ ! -e /opt/luksctl || -L /opt/luksctl ]] || { echo "guest: /opt/luksctl is not a symlink" >&2; exit 2; }
ln -sfn "$prefix" /opt/luksctl
install -d /usr/local/sbin
ln -sfn /opt/luksctl/venv/bin/luksctl /usr/local/sbin/luksctl

# useradd writes /etc/passwd, then fails to rewrite /etc/shadow on the overlay and stops
# before writing /etc/group (groupadd alone works). Without a shadow entry PAM rejects the
# account, so sudo fails. So: group first, then the user, then the shadow entry by hand.
for user in luksctl_api luksctl_api_wn luksctl_proxy; do
    getent group "$user" >/dev/null || groupadd --system "$user"
    id -u "$user" >/dev/null 2>&1 || useradd --system --gid "$user" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin "$user" 2>/dev/null || true
    id -u "$user" >/dev/null
    grep -q "^$user:" /etc/shadow || echo "$user:*:20000:0:99999:7:::" >>/etc/shadow
done
# The proxies' nginx workers (luksctl_proxy) reach each service's socket through its group;
# usermod would rewrite /etc/gshadow as useradd does /etc/shadow, so /etc/group is edited directly.
for group in luksctl_api luksctl_api_wn; do
    members=$(getent group "$group" | cut -d: -f4)
    [[ ,$members, == *,luksctl_proxy,* ]] ||
        sed -i "s/^$group:\([^:]*\):\([^:]*\):\(.*\)\$/$group:\1:\2:\3${members:+,}luksctl_proxy/" /etc/group
done
id -nG luksctl_proxy | grep -qw luksctl_api_wn

# The rules exactly as shipped (the front end's and the worker's), not copies of them.
shopt -s nullglob
for rule in "$repo"/deploy/sudoers.d/*; do
    install -m 0440 -o root -g root "$rule" "/etc/sudoers.d/${rule##*/}"
done
shopt -u nullglob
install -d -m 0755 -o root -g root /etc/luks

cd "$repo"
case $mode in
test | test-systemd | powercut-after)
    # tests/vm/systemd needs systemd as PID 1, so it has a boot of its own (test-systemd);
    # tests/vm/powercut runs on the boot after a hard reset (scripts/vm-powercut.sh).
    case $mode in
    test) tests=(tests/vm --ignore=tests/vm/systemd --ignore=tests/vm/powercut) ;;
    test-systemd) tests=(tests/vm/systemd) ;;
    powercut-after) tests=(tests/vm/powercut) ;;
    esac
    # The VM tests use no third-party pytest plugin; importing them (hypothesis, schemathesis)
    # costs seconds under software emulation.
    export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
    # tee hides pytest's status; PIPESTATUS brings it back. The log lets vm-run.sh
    # print the summary again after the console noise.
    set +e
    rm -f "$out/selected-tests.txt"
    "$prefix/venv/bin/pytest" "${tests[@]}" -p no:cacheprovider --junitxml="$out/junit.xml" "$@" 2>&1 |
        tee "$out/pytest.log"
    rc=${PIPESTATUS[0]}
    ((rc != 0)) && exit "$rc"
    # Exit 0 is not enough: a skip counts as a pass there, and nothing run is no failure.
    "$prefix/venv/bin/python" scripts/vm/check-junit.py "$out/junit.xml" "$out/selected-tests.txt" 2>&1 |
        tee -a "$out/pytest.log"
    exit "${PIPESTATUS[0]}"
    ;;
demo) exec "$prefix/venv/bin/python" scripts/demo.py "$@" ;;
# Ends in a hard reset (sysrq b): the script does not return unless it failed before the cut.
powercut-before) exec "$prefix/venv/bin/python" tests/vm/powercut/before_the_cut.py "$@" ;;
bench)
    # Arguments pick benchmarks by name and set their knobs, which the guest cannot inherit:
    # make bench BENCH="SOAK_SECONDS=20 bench_soak". No name runs all four.
    benches=()
    for arg in "$@"; do
        if [[ $arg == *=* ]]; then export "${arg?}"; else benches+=("$arg"); fi
    done
    ((${#benches[@]})) || benches=(bench bench_status bench_cluster bench_soak)
    for bench in "${benches[@]}"; do
        "$prefix/venv/bin/python" "scripts/$bench.py" || exit
    done
    ;;
*) echo "guest: unknown mode $mode" >&2; exit 2 ;;
esac
