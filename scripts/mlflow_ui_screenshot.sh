#!/usr/bin/env bash
# A real-browser check that the MLflow UI opens a polar experiment on its runs table
# (issue 17, item 14): makes an sqlite store with one experiment created by
# sweeps.runs.ensure_experiment (tagged mlflow.experimentKind=custom_model_development)
# and three runs, starts `mlflow ui` on it, and takes a headless Chromium screenshot of
# the experiment page.
#
#   scripts/mlflow_ui_screenshot.sh [OUT.png]     # default: outputs/mlflow_ui.png
#
# The page opened is sweeps.runs.ui_link's: MLflow 3.17's UI picks its view from the
# `workflowType` query parameter (or the GenAI/Model training switch it remembers), not
# from the experiment's tag; QUERY= (empty) shows the page without it (the GenAI view).
# Needs chromium (Debian: apt-get install -y chromium). Look at the PNG: the page should
# show the runs table (run names job-0..job-2), not the GenAI overview ("Traces").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MLFLOW=${MLFLOW:-.venv/bin/mlflow}
OUT=$(realpath -m "${1:-outputs/mlflow_ui.png}")
BROWSER=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$BROWSER" ] || { echo "no chromium found: apt-get install -y chromium" >&2; exit 2; }
WORK=$(mktemp -d)
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
UI_PID=
cleanup() { [ -n "$UI_PID" ] && kill "$UI_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

URI="sqlite:///$WORK/mlflow.db"
EXP=$(PYTHONPATH=. "$PY" - "$URI" <<'EOF'
import sys
from mlflow import MlflowClient
from sweeps.runs import create_run, end_run, ensure_experiment
uri = sys.argv[1]
exp = ensure_experiment("ui-check", uri)
for i in range(3):
    rid = create_run(exp, f"job-{i}", {"run_key": f"k{i}", "polar.kind": "job"}, uri)
    MlflowClient(uri).log_metric(rid, "val/loss", 1.0 / (i + 1), step=10)
    end_run(MlflowClient(uri), rid, "FINISHED")
print(exp)
EOF
)
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$MLFLOW" ui --backend-store-uri "$URI" --host 127.0.0.1 \
    --port "$PORT" --workers 1 >"$WORK/ui.log" 2>&1 &
UI_PID=$!
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { cat "$WORK/ui.log" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
"$BROWSER" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900 \
    --user-data-dir="$WORK/chrome" --virtual-time-budget=20000 --screenshot="$OUT" \
    "http://127.0.0.1:$PORT/#/experiments/$EXP${QUERY-?workflowType=machine_learning}" 2>"$WORK/chrome.log" || { cat "$WORK/chrome.log" >&2; exit 1; }
echo "screenshot of experiment $EXP: $OUT"
