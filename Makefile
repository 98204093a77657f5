# The two commands of the README: `make serve` and `make test`.
PY       ?= python3.11
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
CONFIG   ?= config/deployment.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE ?= disabled
# Ray's Prometheus endpoint for `make serve` (ray_serve_* and our ray_moe_* metrics)
METRICS_PORT ?= 8080

.PHONY: install test lint typecheck pytest serve demo merge serve-config clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

demo: install
	$(BIN)/python -m moe_demo --config $(CONFIG) build

merge: demo
	$(BIN)/python -m merge_jobs --config $(CONFIG) --all-merged

serve-config: install
	$(BIN)/python -m deployments.serve_config --config $(CONFIG) --out config/serve.yaml

serve: merge
	$(BIN)/python -m deployments.serve_config --config $(CONFIG) --check config/serve.yaml
	$(BIN)/ray start --head --disable-usage-stats --dashboard-host=127.0.0.1 --metrics-export-port=$(METRICS_PORT)
	$(BIN)/python -m moe_demo.ready --metrics http://127.0.0.1:$(METRICS_PORT)/metrics &
	trap '$(BIN)/ray stop >/dev/null 2>&1' EXIT INT TERM; $(BIN)/serve run --address auto config/serve.yaml

clean:
	rm -rf storage .cache
