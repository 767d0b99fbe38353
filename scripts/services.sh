#!/usr/bin/env bash
# Starts PostgreSQL and RabbitMQ if they are not answering, and waits until both do. Every
# step has a deadline: a wedged broker (one out of file descriptors accepts on its port but
# never answers the AMQP handshake) is restarted rather than waited on for ever.
set -euo pipefail

pg_up() { timeout 5 pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

# A broker is up when it answers the AMQP 0-9-1 protocol header with its first frame
# (Connection.Start, frame type 1), not merely when its port accepts.
mq_up() {
  timeout 5 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/5672 || exit 1
    printf "AMQP\x00\x00\x09\x01" >&3
    first=$(head -c 1 <&3 | od -An -tu1 | tr -d " ")
    [ "$first" = 1 ]' 2>/dev/null
}

# The broker holds one descriptor per connection; Debian's default of 1024 is below what
# the parallel test suites open at their peak.
# Debian's wrapper switches to the rabbitmq user through su, which resets the limit, so the
# limit is raised in the broker's own shell.
mq_start() {
  local raise='ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true'
  if [ "$(id -u)" -eq 0 ] && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && id rabbitmq >/dev/null 2>&1; then
    (cd /var/lib/rabbitmq &&
      timeout 60 su rabbitmq -s /bin/sh -c "$raise; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached") || true
  else
    (eval "$raise"; timeout 60 rabbitmq-server -detached) || true
  fi
}

mq_stop() {
  timeout 30 rabbitmqctl -q stop >/dev/null 2>&1 || true
  sleep 1
  pkill -9 -f 'beam.smp.*rabbit' 2>/dev/null || true
  timeout 10 bash -c 'while pgrep -f "beam.smp.*rabbit" >/dev/null; do sleep 0.2; done' || true
}

wait_for() {
  local check=$1 seconds=$2
  for _ in $(seq 1 "$seconds"); do
    if $check; then return 0; fi
    sleep 1
  done
  return 1
}

if ! pg_up; then
  echo "services: starting PostgreSQL"
  for v in $(ls /etc/postgresql 2>/dev/null); do
    timeout 60 pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  done
fi

if ! mq_up; then
  if pgrep -f 'beam.smp.*rabbit' >/dev/null; then
    # Give a broker that is still booting a moment before calling it wedged.
    if ! wait_for mq_up 20; then
      echo "services: RabbitMQ is running but not answering; restarting it"
      mq_stop
      mq_start
    fi
  else
    echo "services: starting RabbitMQ"
    mq_start
  fi
fi

if ! wait_for pg_up 60; then
  echo "services: PostgreSQL did not come up on 127.0.0.1:5432" >&2
  exit 1
fi
if ! wait_for mq_up 120; then
  echo "services: RabbitMQ did not come up on 127.0.0.1:5672" >&2
  exit 1
fi
