# `make demo` runs the whole tiny ChatGPT pipeline on bundled data; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests run on 8 fake CPU devices (sharded steps); the demo on the one CPU device a 2-core machine has (8 fake
# devices on 2 cores more than double its RL stages' time).
TEST_XLA_FLAGS ?= --xla_force_host_platform_device_count=8
WORKDIR ?= runs/pipeline

.PHONY: demo test bench clean

$(VENV)/.core: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.core
	$(PY) -m experiments.pipeline --config=configs/pipeline.py:tiny --workdir=$(WORKDIR)

test: $(VENV)/.test
	XLA_FLAGS=$(TEST_XLA_FLAGS) $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) runs
