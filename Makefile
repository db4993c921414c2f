# Two commands: `make serve` (set up, then run the main job) and `make test` (set up, then the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup prometheus serve demo test clean

setup: $(VENV)/.installed prometheus

# Debian's prometheus, for the tests that check metrics and dashboards against a real Prometheus (they start their
# own on a free loopback port). Installed once, as root; the package's service is never started: a policy-rc.d
# refuses it during the install (one is put in place if the machine has none), and no recommended exporters.
prometheus:
	@if command -v prometheus >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "setup: installing Debian's prometheus package (tests/test_prometheus.py needs it)"; \
	  policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then policy=/usr/sbin/policy-rc.d; \
	    printf '#!/bin/sh\nexit 101\n' > $$policy; chmod +x $$policy; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null; status=$$?; \
	  if [ -n "$$policy" ]; then rm -f $$policy; fi; exit $$status; \
	else \
	  echo "setup: no prometheus binary: install Debian's 'prometheus' package (as root: apt-get install" \
	       "--no-install-recommends prometheus), or put a release from https://prometheus.io/download/ on PATH;" \
	       "until then the tests against a real Prometheus are skipped"; \
	fi

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
