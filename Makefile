# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moalign-installed
COMPILED := $(VENV)/.moalign-compiled
# The CPU build, installed only where an environment has no torch
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-lowest bench lint clean

install: $(STAMP)

# CPU torch first, and only when the environment has no torch: a GPU build stays untouched.
# --no-compile: byte-compiling every installed module took more CPU than the install itself (torch: 28 s vs 9 s);
# Python compiles what a run imports, once, on first use.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile $(TORCH)
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	touch $(STAMP)

# The tests start many Python processes (torchrun, the CLI, servers): byte-compile the environment once for them
# rather than in every process (where PYTHONDONTWRITEBYTECODE is set, each would compile torch again). Some
# packages ship files that are not meant to compile (templates); compileall's status reports those, not a failure.
$(COMPILED): $(STAMP)
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") > /dev/null || true
	touch $(COMPILED)

demo: install
	$(VENV)/bin/moalign demo

test: install $(COMPILED)
	$(PY) -m pytest -q -p no:cacheprovider

bench: install $(COMPILED)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick,)

# The lower bounds in pyproject.toml, checked: the tests in a second environment holding the lowest versions they
# allow (uv's lowest-direct resolution). torch stays the build installed there: old ones come only as CUDA builds.
LOWEST ?= .venv-lowest
test-lowest:
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip uv
	$(LOWEST)/bin/python -c "import torch" 2>/dev/null || $(LOWEST)/bin/python -m pip install -q --no-compile $(TORCH)
	$(LOWEST)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(LOWEST)/torch.txt
	$(LOWEST)/bin/uv pip compile -q pyproject.toml --extra dev --resolution lowest-direct \
		--python $(LOWEST)/bin/python --override $(LOWEST)/torch.txt -o $(LOWEST)/lowest.txt
	$(LOWEST)/bin/python -m pip install -q --no-compile -c $(LOWEST)/lowest.txt -e ".[dev]"
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(LOWEST) runs .pytest_cache .ruff_cache
