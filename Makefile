# Two commands on a fresh machine: `make demo` (pre-train on the built-in phantom data, fine-tune with few
# labels, print Dice against training from scratch) and `make test` (the whole test suite, CPU only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

$(VENV)/.installed: pyproject.toml ci/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c ci/constraints-cpu.txt -e ".[test,medical,demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/macl demo

bench: install
	$(PY) benchmarks/bench_core_cpu.py

.PHONY: install test demo bench
