# Every target runs inside .venv/ at the repo root; `make install` creates it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo demo-ablations bench clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[dev]'

test:
	$(VENV)/bin/pytest -q

demo:
	$(PY) -m instructblip.demo

demo-ablations:
	$(PY) -m instructblip.demo ablations=true

bench:
	$(PY) experiments/bench/run_all.py

clean:
	rm -rf outputs logs multirun .pytest_cache
