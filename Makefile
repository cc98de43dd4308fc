# `make demo` and `make test` each create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch, from this machine's disk; on GPU machines use e.g. TORCH_SPEC='torch==2.13.0'
# with the CUDA index of your choice.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_MODEL ?= models/shapes-sd
DEMO_OUT ?= outputs/demo
include deploy/image.env

.PHONY: install demo test test-slow image lock clean

install: $(STAMP)

# deploy/install.sh is the one install path: the image (deploy/Dockerfile) runs it too. It installs
# the versions of deploy/requirements-test.lock, so a fresh clone gets what the tests ran on.
$(STAMP): pyproject.toml deploy/install.sh deploy/requirements.lock deploy/requirements-test.lock
	test -x $(PY) || python3 -m venv $(VENV)
	bash deploy/install.sh $(PY) "$(TORCH_SPEC)" test
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --model $(DEMO_MODEL) --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest

# The long checks that make test skips (pytest's "slow" marker), run on purpose: the README says
# which and when.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Re-resolve both locks (deploy/lock.sh says how to move versions: LOCK_ARGS=--upgrade, ...).
lock:
	bash deploy/lock.sh "$(TORCH_SPEC)" $(LOCK_ARGS)

# The cluster image (needs a Docker engine; see deploy/README.md).
image:
	docker build -f deploy/Dockerfile --build-arg TORCH_SPEC="$(TORCH_SPEC)" -t $(IMAGE) .

clean:
	rm -rf $(VENV) .cache outputs
