#!/usr/bin/env bash
# Builds the wheelhouse the systemd boot installs luksctl from with deploy/install.sh (the guest
# has no network): every pinned dependency of requirements.lock and the build backend pinned in
# requirements-build.lock (install.sh builds luksctl itself from the source tree, with that
# backend), hashes checked. Made with PYTHON, the guest's interpreter. Rebuilt only when a lock
# file, pyproject.toml or PYTHON changes, so edits to the source cost nothing here.
# usage: scripts/build-wheelhouse.sh WHEELHOUSE PYTHON
set -euo pipefail
usage="usage: $0 WHEELHOUSE PYTHON"
wheels=${1:?$usage}
python=${2:?$usage}
repo=$(cd "$(dirname "$0")/.." && pwd)
stamp=$wheels/.stamp

want=$( { cat "$repo/requirements.lock" "$repo/requirements-build.lock" "$repo/pyproject.toml"; echo "$python"; } | sha256sum | cut -d' ' -f1)
[[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]] && exit 0
echo "build-wheelhouse: building $wheels"
rm -rf "$wheels"
mkdir -p "$wheels"
venv=$(mktemp -d /tmp/wheelhouse-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/pip" download --quiet --require-hashes -r "$repo/requirements.lock" -r "$repo/requirements-build.lock" -d "$wheels"
chmod -R go+rX "$wheels"
echo "$want" >"$stamp"
