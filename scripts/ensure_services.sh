#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on their local ports; start any that is installed
# but stopped (the commands of this machine kind), and wait until each answers.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2 tries=${3:-60}
  for _ in $(seq "$tries"); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "ensure_services: $name did not come up on port $port" >&2
  return 1
}

if ! port_open 5432; then
  echo "ensure_services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_port postgres 5432
fi
for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done

if ! port_open 6379; then
  echo "ensure_services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port redis 6379
fi

if ! port_open 5672; then
  echo "ensure_services: starting RabbitMQ"
  rabbitmq-server -detached
  wait_port rabbitmq 5672 120
fi
# The port opens before the broker accepts logins; wait until the node reports itself running.
for _ in $(seq 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
echo "ensure_services: postgres, redis and rabbitmq are up"
