# Volley: `make run` runs the whole system, `make test` runs every test.
.PHONY: setup services build test lint run up down bench chaos

CARGO ?= cargo

setup:
	@scripts/setup.sh

services: setup
	@scripts/services.sh

build: setup
	$(CARGO) build --workspace

# Real RabbitMQ and PostgreSQL are started if they are not running; each test makes its own
# database and queue prefix, so tests run in parallel. The binaries are built first because
# the short fault-injection run (crates/volley-chaos/tests/short.rs) starts them.
test: services
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast

# rustfmt, clippy, rustdoc, unused dependencies and deny.toml's dependency policy.
lint: setup
	@scripts/lint.sh

run: setup
	@scripts/stack.sh run

up: setup
	@scripts/stack.sh up

down:
	@scripts/stack.sh down

# The benchmark (release build; several minutes): Volley against this machine's own ceiling.
# The binary runs straight from the workspace build: `cargo run -p` would unify features
# differently and rebuild.
bench: services
	$(CARGO) build --release --workspace --bins
	$${CARGO_TARGET_DIR:-target}/release/volley-bench $(BENCH_ARGS)
	$(CARGO) bench --workspace --bench micro

# The fault-injection suite (release build; a few minutes): the services as separate processes
# on a RabbitMQ node and a PostgreSQL cluster of its own, killed and restarted under load, then
# checked for lost or inconsistent jobs. Prints one summary line; CHAOS_ARGS="--seed N" replays.
chaos: setup
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -p volley-chaos --bin chaos -- $(CHAOS_ARGS)
