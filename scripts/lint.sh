#!/usr/bin/env bash
# The lint gate: formatting, clippy, documentation, unused dependencies and the dependency
# policy in deny.toml. `make lint` and CI run it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so that a new release of a checker cannot fail an unchanged tree.
MACHETE_VERSION=0.9.2
DENY_VERSION=0.20.2

ensure() {
  local bin=$1 crate=$2 version=$3
  if ! "$bin" --version 2>/dev/null | grep -q "$version"; then
    echo "lint: installing $crate $version"
    cargo install --locked --quiet "$crate@$version"
  fi
}

echo "lint: rustfmt"
cargo fmt --all -- --check
echo "lint: clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "lint: rustdoc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "lint: unused dependencies"
ensure cargo-machete cargo-machete "$MACHETE_VERSION"
cargo machete
echo "lint: dependency policy (deny.toml)"
ensure cargo-deny cargo-deny "$DENY_VERSION"
# Advisories need the advisory database from GitHub; LINT_ADVISORIES=1 adds them where it
# is reachable.
checks=(bans licenses sources)
[ "${LINT_ADVISORIES:-0}" = 1 ] && checks+=(advisories)
cargo deny --log-level error check "${checks[@]}"
echo "lint: clean"
