# `make demo` and `make test` each create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch, from this machine's disk; on GPU machines use e.g. TORCH_SPEC='torch==2.13.0'
# with the CUDA index of your choice.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_MODEL ?= models/shapes-sd
DEMO_OUT ?= outputs/demo

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --model $(DEMO_MODEL) --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache outputs
