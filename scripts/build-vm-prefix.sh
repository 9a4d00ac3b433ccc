#!/usr/bin/env bash
# Builds the venv the VM guest runs luksctl from: PREFIX/venv plus PREFIX/gunicorn.conf.py.
# It lives outside /root (mode 700 on CI) and is made from Debian's interpreter, because the
# guest's unprivileged service users (luksctl_api, luksctl_api_wn) must be able to execute it.
# The package is installed, not linked, so the guest runs exactly what this tree builds.
set -euo pipefail
usage="usage: $0 PREFIX PYTHON"
prefix=${1:?$usage}
python=${2:?$usage}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$prefix/venv
stamp=$venv/.deps-stamp

# Dependencies change only with pyproject.toml or the interpreter; rebuild the venv only then.
want=$( { cat "$repo/pyproject.toml"; echo "$python"; } | sha256sum | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "build-vm-prefix: creating $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "$repo[server,test]"
    echo "$want" >"$stamp"
else
    # The source changes on every edit; reinstalling only the package itself takes seconds.
    "$venv/bin/pip" install -q --no-deps --force-reinstall "$repo"
fi

install -m 0644 "$repo/deploy/gunicorn.conf.py" "$prefix/gunicorn.conf.py"
chmod -R go+rX "$prefix"
