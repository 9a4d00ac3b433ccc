#!/usr/bin/env bash
# Install luksctl on a front-end node or a worker node, as root:
#
#   sudo deploy/install.sh frontend [single_vm|docker|cluster] --vault-url https://vault.example:8200 [--vault-url URL]...
#   sudo deploy/install.sh worker
#
# --vault-url: the Vault(s) that open may contact (VAULT_URL_ALLOWLIST of a freshly
# written config.json); without it, open is refused until the allowlist is set.
# Idempotent: re-running upgrades the package and keeps existing config,
# certificate and cluster token. See README.md, "Install on a VM".
set -euo pipefail

usage="usage: $0 frontend [single_vm|docker|cluster] [--vault-url URL]... | worker"
role=${1:-}
shift || true
profile=single_vm
if [[ $# -gt 0 && $1 != --* ]]; then profile=$1; shift; fi
vault_urls=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --vault-url) [[ $# -ge 2 ]] || { echo "$usage" >&2; exit 64; }; vault_urls+=(--vault-url "$2"); shift 2 ;;
        *) echo "$usage" >&2; exit 64 ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/luksctl
python=${PYTHON:-/usr/bin/python3}

case "$role" in
    frontend) user=luksctl_api; unit=luksctl-api; sample="$repo/deploy/config/$profile.json" ;;
    worker) user=luksctl_api_wn; unit=luksctl-api-wn; sample="$repo/deploy/config/worker.json" ;;
    *) echo "$usage" >&2; exit 64 ;;
esac
[[ $(id -u) == 0 ]] || { echo "$0: run as root" >&2; exit 1; }
[[ -f $sample ]] || { echo "$0: no sample config $sample" >&2; exit 64; }
# The proxy on port 5000 (README, Security: slow clients). Only its binary is used: a system
# nginx.service, if any, keeps its own configuration and is neither needed nor touched.
[[ -x /usr/sbin/nginx ]] || { echo "$0: nginx is missing: apt-get install nginx (or dnf install nginx)" >&2; exit 1; }
proxy_user=luksctl_proxy

step() { printf '==> %s\n' "$*"; }

step "venv $prefix/venv (from $python) with luksctl from $repo"
install -d -m 0755 -o root -g root "$prefix"
[[ -x $prefix/venv/bin/python ]] || "$python" -m venv "$prefix/venv"
# The dependencies and the build backend exactly as pinned, hashes checked (every node runs the
# same bytes); then luksctl alone, built by that backend: without --no-build-isolation pip would
# fetch an unpinned setuptools and run it here, as root.
"$prefix/venv/bin/pip" install --quiet --require-hashes -r "$repo/requirements.lock" -r "$repo/requirements-build.lock"
"$prefix/venv/bin/pip" install --quiet --upgrade --no-deps --no-build-isolation "$repo[server]"
install -m 0644 -o root -g root "$repo/deploy/gunicorn.conf.py" "$repo/README.md" "$prefix/"
ln -sfn "$prefix/venv/bin/luksctl" /usr/local/sbin/luksctl
# Deployments call fastluks by name, as they called pyluks' (on root's PATH, beside luksctl).
ln -sfn "$prefix/venv/bin/fastluks" /usr/local/sbin/fastluks

step "system user $user"
if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
fi

step "proxy user $proxy_user, in group $user (to reach the service's socket)"
if ! id -u "$proxy_user" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$proxy_user"
fi
id -nG "$proxy_user" | tr " " "\n" | grep -qx "$user" || usermod --append --groups "$user" "$proxy_user"

step "sudoers rule /etc/sudoers.d/$unit (luksctl only)"
install -m 0440 -o root -g root "$repo/deploy/sudoers.d/$unit" "/etc/sudoers.d/.$unit.new"
if visudo -cf "/etc/sudoers.d/.$unit.new" >/dev/null; then
    mv "/etc/sudoers.d/.$unit.new" "/etc/sudoers.d/$unit"
else
    rm -f "/etc/sudoers.d/.$unit.new"
    echo "$0: the sudoers rule did not validate; nothing was changed" >&2
    exit 1
fi

step "config /etc/luks"
install -d -m 0755 -o root -g root /etc/luks
if [[ ! -e /etc/luks/config.json ]]; then
    if [[ $role == frontend ]]; then
        "$prefix/venv/bin/$unit" write-config --sample "$sample" ${vault_urls[@]+"${vault_urls[@]}"} > /etc/luks/.config.json.new
        install -m 0644 -o root -g root /etc/luks/.config.json.new /etc/luks/config.json
        rm -f /etc/luks/.config.json.new
    else
        install -m 0644 -o root -g root "$sample" /etc/luks/config.json
    fi
    echo "    wrote /etc/luks/config.json from $(basename "$sample"): edit it (README, Configuration)"
elif [[ ${#vault_urls[@]} -gt 0 ]]; then
    echo "    kept the existing /etc/luks/config.json: --vault-url was not applied (set VAULT_URL_ALLOWLIST there)"
fi
if [[ $role == frontend && ! -e /etc/luks/luks-cryptdev.ini ]]; then
    echo "    note: /etc/luks/luks-cryptdev.ini is missing; the encryption step (fast-luks) writes it"
fi
if [[ $role == worker ]]; then
    # The front end's protection stops at the export: a set-uid file or a device node on it must not act here.
    echo "    /etc/fstab: mount the front end's export nosuid,nodev, e.g. 10.0.0.1:/export /export nfs4 rw,nosuid,nodev,nofail,_netdev 0 0"
fi

step "TLS certificate /etc/luks/gunicorn-cert.pem"
if [[ ! -e /etc/luks/gunicorn-cert.pem ]]; then
    "$prefix/venv/bin/$unit" gen-cert
fi

step "cluster token /etc/luks/cluster-token"
if [[ $role == frontend && $profile == cluster && ! -e /etc/luks/cluster-token ]]; then
    (umask 077; "$prefix/venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))' > /etc/luks/cluster-token)
    echo "    generated; copy it to every worker as /etc/luks/cluster-token"
fi
if [[ -e /etc/luks/cluster-token ]]; then
    chown root:"$user" /etc/luks/cluster-token
    chmod 0640 /etc/luks/cluster-token
elif [[ $role == worker ]]; then
    echo "    missing: copy /etc/luks/cluster-token from the front end, then: systemctl restart $unit"
fi

step "validate config"
LUKSCTL_API_CONFIG=/etc/luks/config.json "$prefix/venv/bin/$unit" check-config

step "systemd units $unit.service and luksctl-proxy@$unit.service"
install -m 0644 -o root -g root "$repo/deploy/$unit.service" "$repo/deploy/luksctl-proxy@.service" /etc/systemd/system/
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable "$unit.service" "luksctl-proxy@$unit.service"
    # The proxy is PartOf= the service: this restarts both, and the proxy regenerates its configuration.
    systemctl restart "$unit.service"
    systemctl start "luksctl-proxy@$unit.service"
    systemctl --no-pager --lines=5 status "$unit.service" "luksctl-proxy@$unit.service" || true
else
    echo "    systemd is not running here: start it later with systemctl enable --now $unit luksctl-proxy@$unit"
fi

if [[ $role == frontend ]]; then
    step "systemd timer luksctl-report.timer (the volume's root-only facts for the node exporter)"
    install -m 0644 -o root -g root -t /etc/systemd/system "$repo/deploy/luksctl-report.service" "$repo/deploy/luksctl-report.timer"
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        systemctl enable --now luksctl-report.timer
    fi
fi
