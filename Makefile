# Two commands: `make quickstart` (set up, then run the quickstart sweep on the bundled digits) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the builds this project is tested with; pip takes them from its cache or index.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: quickstart test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/raymix tune search_spaces/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check raymix tests benchmarks
	$(BIN)/ruff format --check raymix tests benchmarks
	$(BIN)/mypy raymix

# The CPU benchmarks (about 130 minutes on 2 cores: 40 of them search_efficiency, 35 method_gains); each writes benchmarks/results/*.json.
bench: install
	$(BIN)/python benchmarks/method_step.py
	$(BIN)/python benchmarks/step_cost.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/knn_speed.py
	$(BIN)/python benchmarks/eval_share.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/trial_overhead.py
	$(BIN)/python benchmarks/ray_startup.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/search_efficiency.py
	$(BIN)/python benchmarks/method_gains.py

clean:
	rm -rf runs sweeps mlflow.db mlartifacts .pytest_cache .mypy_cache .ruff_cache
