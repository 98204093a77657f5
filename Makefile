# The two commands of the README: `make serve` and `make test`.
PY       ?= python3.11
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
CONFIG   ?= config/deployment.yaml
# the Serve config `make serve` runs: the committed one for the default config, else one generated from CONFIG
SERVE_YAML ?= $(if $(filter config/deployment.yaml,$(CONFIG)),config/serve.yaml,.cache/serve/$(notdir $(CONFIG)))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE ?= disabled
# Ray's Prometheus endpoint for `make serve` (ray_serve_* and our ray_moe_* metrics)
METRICS_PORT ?= 8080

.PHONY: install test lint typecheck pytest serve demo merge serve-config local-s3 clean

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
ifeq ($(SERVE_YAML),config/serve.yaml)
	$(BIN)/python -m deployments.serve_config --config $(CONFIG) --check $(SERVE_YAML)
else
	@mkdir -p $(dir $(SERVE_YAML))
	$(BIN)/python -m deployments.serve_config --config $(CONFIG) --out $(SERVE_YAML)
endif
	$(BIN)/ray start --head --disable-usage-stats --dashboard-host=127.0.0.1 --metrics-export-port=$(METRICS_PORT)
	$(BIN)/python -m moe_demo.ready --metrics http://127.0.0.1:$(METRICS_PORT)/metrics &
	trap '$(BIN)/ray stop >/dev/null 2>&1' EXIT INT TERM; $(BIN)/serve run --address auto $(SERVE_YAML)

# A loopback S3 endpoint (moto's server, in memory) with the bucket of config/deployment.s3.yaml; Ctrl-C stops it
local-s3: install
	$(BIN)/python -m moe_core.local_s3 --port 9000 --bucket moe-demo

clean:
	rm -rf storage .cache
