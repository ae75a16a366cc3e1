#!/usr/bin/env bash
# Installs kosoku (PyPI), the Autobahn|Testsuite fuzzing client that
# transports/websocket/tests/autobahn.rs runs against the WebSocket framing,
# into a virtualenv at target/kosoku-venv (where the test looks for it), and
# prints the path of its executable. Needs python3 with venv (Debian:
# python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/kosoku-venv
if [ ! -x "$venv/bin/kosoku" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check kosoku==0.1.0 >&2
fi
echo "$PWD/$venv/bin/kosoku"
