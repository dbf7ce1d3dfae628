# Two commands on a fresh machine: `make run` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 2

.PHONY: run test bench lint format clean observe

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,mnist,serve,bench,signals,text,lora,onnx]'
	touch $(STAMP)

MODEL ?= models/mnist-cond
PORT ?= 8000

run: $(STAMP)
	$(PY) -m difforge.cli sample --model $(MODEL) --n 20 --seed 42 \
		--sampler dpmpp_2m --steps 20 --guidance 3 --out runs/make-run/grid.png
	@echo "sample grid: runs/make-run/grid.png"
	@echo "starting the service: open http://127.0.0.1:$(PORT)/ (Ctrl-C stops it)"
	$(PY) -m difforge.cli serve --model $(MODEL) --host 127.0.0.1 --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not slow and not gpu"

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# a local Prometheus scraping a service started with `make run` (scripts/observe.sh)
observe:
	PORT=$(PORT) bash scripts/observe.sh
