#!/usr/bin/env bash
# Builds the wheelhouse the systemd boot installs luksctl from with deploy/install.sh (the guest
# has no network): every dependency as a wheel, plus the build backend, because install.sh
# builds luksctl itself from the source tree. Made with PYTHON, the guest's interpreter.
# Rebuilt only when pyproject.toml or PYTHON changes; luksctl's own wheel is left out (the
# install builds it from the tree), so edits to the source cost nothing here.
# usage: scripts/build-wheelhouse.sh WHEELHOUSE PYTHON
set -euo pipefail
usage="usage: $0 WHEELHOUSE PYTHON"
wheels=${1:?$usage}
python=${2:?$usage}
repo=$(cd "$(dirname "$0")/.." && pwd)
stamp=$wheels/.stamp

want=$( { cat "$repo/pyproject.toml"; echo "$python"; } | sha256sum | cut -d' ' -f1)
[[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]] && exit 0
echo "build-wheelhouse: building $wheels"
rm -rf "$wheels"
mkdir -p "$wheels"
venv=$(mktemp -d /tmp/wheelhouse-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/pip" wheel --quiet "$repo" -w "$wheels"
"$venv/bin/pip" download --quiet 'setuptools>=77' -d "$wheels"
rm -f "$wheels"/luksctl-*.whl
chmod -R go+rX "$wheels"
echo "$want" >"$stamp"
