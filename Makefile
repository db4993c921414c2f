# Two commands: `make serve` (set up, then run the main job) and `make test` (set up, then the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve demo test clean

setup: $(VENV)/.installed

# torch is installed first, by exact version: on a CPU machine pip takes the local CPU build, and nothing
# later pulls a CUDA build. On a GPU machine `pip install -e .[gpu]` adds xformers.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

serve: setup
	$(VENV)/bin/srserve serve deployments/local.yaml --host $(HOST) --port $(PORT)

demo: setup
	$(VENV)/bin/srserve generate "a red circle moving right" --out out/demo.mp4

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out runs
