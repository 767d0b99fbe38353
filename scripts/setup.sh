#!/usr/bin/env bash
# Installs what building and testing Volley needs from Debian's packages, if missing:
# libpq (diesel links it), pkg-config, the PostgreSQL and RabbitMQ servers, espeak-ng (local
# text-to-speech), tmux (the CLI's pseudo-terminal test), Chromium, Node.js and npm (the web
# console's browser tests). Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
for pkg in libpq-dev pkg-config postgresql rabbitmq-server espeak-ng curl tmux; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# By command, not by package: a Node.js or Chromium installed otherwise serves as well.
for cmd in chromium node npm; do
  if ! command -v "$cmd" >/dev/null; then
    case "$cmd" in
      node) need+=(nodejs) ;;
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
