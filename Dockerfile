# syntax=docker/dockerfile:1
#
# One multi-stage build for every Volley binary. Build one image per binary by target:
#
#   docker build --target gateway      -t volley/gateway:latest .
#   docker build --target worker-video -t volley/worker-video:latest .
#
# (docker compose does this for every service.) Stages:
#   chef     - Rust toolchain + cargo-chef + the C headers the build needs (libpq-dev)
#   planner  - computes the dependency "recipe" from the manifests and Cargo.lock
#   builder  - builds the dependencies from the recipe (cached layer: it is rebuilt only when
#              a Cargo.toml or Cargo.lock changes), then the whole workspace
#   runtime  - debian slim + the runtime libraries only (no compiler, no headers); non-root user
#   <binary> - one target per binary: runtime + that binary, ENTRYPOINT = the binary
#
# No protoc is needed: volley-proto compiles proto/ with the pure-Rust protox.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /app

# ---------------------------------------------------------------------------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------------------------
FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only (workspace crates are replaced by empty stubs here).
RUN cargo chef cook --release --workspace --recipe-path recipe.json
COPY . .
RUN cargo build --release --workspace --locked

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# libpq5: diesel's PostgreSQL driver; ca-certificates: TLS to providers, S3, managed databases;
# curl: only for container health checks (docker compose); it is not a build tool.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libpq5 curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 volley \
    && useradd --system --uid 10001 --gid volley --home-dir /var/lib/volley \
       --shell /usr/sbin/nologin volley \
    && mkdir -p /var/lib/volley/media /etc/volley \
    && chown -R volley:volley /var/lib/volley
# A default configuration (the repo's catalogue); compose and Kubernetes mount their own over it.
COPY config/volley.toml /etc/volley/volley.toml
ENV VOLLEY_CONFIG=/etc/volley/volley.toml \
    VOLLEY_MEDIA_DIR=/var/lib/volley/media \
    RUST_LOG=info
WORKDIR /var/lib/volley

# The TTS worker also needs espeak-ng, a real local text-to-speech engine.
FROM runtime AS runtime-tts
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# One target per binary.

FROM runtime AS gateway
COPY --from=builder /app/target/release/gateway /usr/local/bin/gateway
USER volley
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gateway"]

FROM runtime AS batch-state
COPY --from=builder /app/target/release/batch-state /usr/local/bin/batch-state
USER volley
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/batch-state"]

FROM runtime AS worker-llm
COPY --from=builder /app/target/release/worker-llm /usr/local/bin/worker-llm
USER volley
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/worker-llm"]

FROM runtime AS worker-image
COPY --from=builder /app/target/release/worker-image /usr/local/bin/worker-image
USER volley
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/worker-image"]

FROM runtime AS worker-video
COPY --from=builder /app/target/release/worker-video /usr/local/bin/worker-video
USER volley
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/worker-video"]

FROM runtime AS worker-music
COPY --from=builder /app/target/release/worker-music /usr/local/bin/worker-music
USER volley
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/worker-music"]

FROM runtime-tts AS worker-tts
COPY --from=builder /app/target/release/worker-tts /usr/local/bin/worker-tts
USER volley
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/worker-tts"]

# Stands in for third-party providers in local runs (compose, the Kubernetes dev overlay).
FROM runtime AS provider-sim
COPY --from=builder /app/target/release/provider-sim /usr/local/bin/provider-sim
USER volley
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/provider-sim"]

# Operator CLI: `batchctl migrate`, `batchctl keys create --name N`, ...
FROM runtime AS batchctl
COPY --from=builder /app/target/release/batchctl /usr/local/bin/batchctl
USER volley
ENTRYPOINT ["/usr/local/bin/batchctl"]
