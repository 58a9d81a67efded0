#!/usr/bin/env bash
# The e-commerce example as five processes: starts the User, Order, Inventory, Payment
# and Shipping services, each with its own PostgreSQL schema, over NATS JetStream; runs
# the driver against them; stops them. Needs NATS_URL and DATABASE_URL (scripts/test
# provisions both for the tests; for a manual run start `nats-server -js` and a
# PostgreSQL server yourself). Each service's /metrics, /health and /ready address is
# printed when it is ready; the logs are in $ECOMMERCE_LOGS (default: a temp dir).
set -euo pipefail
: "${NATS_URL:?set NATS_URL (nats://127.0.0.1:4222)}"
: "${DATABASE_URL:?set DATABASE_URL (postgres://...)}"
cd "$(dirname "$0")/.."
export ECOMMERCE_PREFIX="${ECOMMERCE_PREFIX:-ecommerce_$(date +%s)}"
export ECOMMERCE_PAYMENT_TIMEOUT_SECS="${ECOMMERCE_PAYMENT_TIMEOUT_SECS:-5}"
logs="${ECOMMERCE_LOGS:-$(mktemp -d)}"
cargo build -q -p eventcore-examples --example distributed_ecommerce
bin=target/debug/examples/distributed_ecommerce
pids=()
stop() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop EXIT
for service in user order inventory payment shipping; do
  "$bin" --service "$service" >"$logs/$service.log" 2>&1 &
  pids+=("$!")
done
for service in user order inventory payment shipping; do
  for _ in $(seq 1 300); do
    grep -q "ready:" "$logs/$service.log" 2>/dev/null && break
    sleep 0.1
  done
  grep "ready:" "$logs/$service.log" || { echo "the $service service did not start:"; cat "$logs/$service.log"; exit 1; }
done
"$bin" --drive
echo "logs: $logs; schemas ${ECOMMERCE_PREFIX}_<service> (drop them when done)"
