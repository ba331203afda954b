#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer; starts them when installed but stopped (no systemd here).
set -euo pipefail
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null; then
    ver=$(ls /etc/postgresql | sort -n | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
fi
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "start-services: PostgreSQL is not answering on 127.0.0.1:5432" >&2; exit 1; }
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi
redis-cli -h 127.0.0.1 ping >/dev/null || { echo "start-services: Redis is not answering on 127.0.0.1:6379" >&2; exit 1; }
echo "start-services: PostgreSQL and Redis are up"
