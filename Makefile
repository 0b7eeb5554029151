# Two commands on a fresh machine: `make demo` and `make test`. Both create/refresh the venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean bench soak

# torch is installed first with an exact pin: a loose requirement can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polymorphd demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

# Micro-benchmarks of the per-frame hot paths (bench/test_*.py, pytest-benchmark); not part of `make test`.
# The modes side by side on a real bundle is `polymorphd bench` (bench/README.md).
bench: $(STAMP)
	$(VENV)/bin/pytest -q bench --benchmark-only --benchmark-columns=min,median,mean,iqr,ops,rounds

# Reliability soak (docs/RELIABILITY.md): 100,000 frames at full speed with hot swaps and rollbacks; not part of
# `make test`. Exports its tiny bundles into ~/.cache/polymorphd/bench-bundles the first time (train extra).
soak: $(STAMP)
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
