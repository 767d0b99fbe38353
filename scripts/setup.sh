#!/usr/bin/env bash
# Installs what building and testing Volley needs from Debian's packages, if missing:
# libpq (diesel links it), pkg-config, the PostgreSQL and RabbitMQ servers, espeak-ng (local
# text-to-speech), tmux (the CLI's pseudo-terminal test), Chromium, Node.js and npm (the web
# console's browser tests) and Python 3 (schemathesis and the webhook receiver). Needs root (or
# sudo) only when something is missing.
set -euo pipefail

need=()
for pkg in libpq-dev pkg-config postgresql rabbitmq-server espeak-ng curl tmux; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# By command, not by package: a Node.js or Chromium installed otherwise serves as well.
for cmd in chromium node npm python3; do
  if ! command -v "$cmd" >/dev/null; then
    case "$cmd" in
      node) need+=(nodejs) ;;
      python3) need+=(python3 python3-venv) ;;
      *) need+=("$cmd") ;;
    esac
  fi
done
if ! command -v cargo >/dev/null; then
  echo "setup: cargo is not installed; install Rust (rustup) first" >&2
  exit 1
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The browser tests' driver (playwright-core, pinned by the lock file; it uses the chromium
# above and downloads no browser of its own).
console="$(dirname "$0")/../tests/console"
if [ ! -d "$console/node_modules" ]; then
  echo "setup: installing the console tests' node modules"
  (cd "$console" && npm ci --no-audit --no-fund --loglevel=error)
fi
# Python tools the tests run (schemathesis, the Standard Webhooks reference library), in a
# virtual environment of the project's own, reinstalled when tests/python/requirements.txt changes.
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/tests/python/requirements.txt"
stamp="$root/.venv/.requirements"
if [ ! -x "$root/.venv/bin/python" ] || ! cmp -s "$req" "$stamp"; then
  echo "setup: installing the tests' Python tools into .venv"
  python3 -m venv "$root/.venv"
  "$root/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi
