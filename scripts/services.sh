#!/usr/bin/env bash
# Starts PostgreSQL and RabbitMQ if they are not answering, and waits until both do.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
mq_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! pg_up; then
  echo "services: starting PostgreSQL"
  for v in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  done
fi
if ! mq_up; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
fi
for _ in $(seq 1 120); do
  if pg_up && mq_up; then
    # The AMQP port opens a little before the broker accepts connections.
    if command -v rabbitmqctl >/dev/null; then
      rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    fi
    exit 0
  fi
  sleep 1
done
echo "services: PostgreSQL or RabbitMQ did not come up (127.0.0.1:5432, 127.0.0.1:5672)" >&2
exit 1
