#!/usr/bin/env bash
# Start a real local Prometheus that scrapes a running difforge service on loopback and loads the
# alert rules of deploy/monitoring/alerts.yml; Ctrl-C stops it (its data lives in a temporary
# folder and goes with it). For people who want to look; no test runs it.
#
#   difforge serve --model models/mnist-cond --host 127.0.0.1 --port 8000 &
#   bash scripts/observe.sh            # or `make observe`; then open http://127.0.0.1:9090
#
# Environment: PORT (the service's, 8000), PROM_PORT (Prometheus', 9090), SCRAPE (interval, 5s).
# /metrics answers loopback clients without a key; a service behind API keys needs scope admin,
# which this script does not configure. Prometheus comes from Debian: apt-get install prometheus.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
PROM_PORT=${PROM_PORT:-9090}
SCRAPE=${SCRAPE:-5s}
prometheus=$(command -v prometheus || true)
if [ -z "$prometheus" ]; then
  echo "error: prometheus is not installed (Debian: apt-get install prometheus)" >&2
  exit 1
fi
if ! curl -fsS "http://127.0.0.1:$PORT/metrics" >/dev/null 2>&1; then
  echo "warning: nothing answers http://127.0.0.1:$PORT/metrics yet (start difforge serve)" >&2
fi

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp deploy/monitoring/alerts.yml "$dir/alerts.yml"
cat >"$dir/prometheus.yml" <<YAML
global:
  scrape_interval: $SCRAPE
  evaluation_interval: $SCRAPE
rule_files:
  - alerts.yml
scrape_configs:
  - job_name: difforge
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$PORT"]
YAML
promtool check config "$dir/prometheus.yml"
echo "Prometheus on http://127.0.0.1:$PROM_PORT scraping 127.0.0.1:$PORT every $SCRAPE (Ctrl-C stops)"
"$prometheus" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait "$pid"
