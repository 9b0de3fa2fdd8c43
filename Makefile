# mmbhvit developer tasks. `make test` is what CI runs (.ci/run).
#
#   make venv   create $(VENV) and install the pinned stack + mmbhvit (editable)
#   make test   run the test suite (extra pytest options: PYTEST_ARGS=...)
#   make test-quick   the suite without the tests marked `slow` (training
#               runs in subprocesses, torchrun, resume): the edit loop
#   make demo   run tools/demo/run_demo.py
#
# VENV may point elsewhere, e.g. `make venv VENV=/tmp/scratch-venv`.

PYTHON ?= python3.11
VENV ?= .venv
PYTEST_ARGS ?=

VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmbhvit-installed
REQUIREMENTS := requirements/torch.txt requirements/runtime.txt \
	requirements/tests.txt
PIP := $(VENV_PY) -m pip --disable-pip-version-check

.PHONY: venv test test-quick demo clean-venv

venv: $(STAMP)

# torch first, on its own (pinned: an unpinned torch pulls a CUDA build),
# then the rest with the torch pins repeated so pip cannot move torch,
# then mmbhvit itself, editable, without touching the pins.
$(STAMP): $(REQUIREMENTS) setup.py setup.cfg
	@if [ ! -x "$(VENV_PY)" ]; then \
		if command -v "$(PYTHON)" >/dev/null 2>&1; then py="$(PYTHON)"; \
		else echo "$(PYTHON) not found, using python3"; py=python3; fi; \
		echo "creating $(VENV) with $$py"; \
		"$$py" -m venv "$(VENV)"; \
	fi
	$(PIP) install -r requirements/torch.txt
	$(PIP) install -r requirements/torch.txt -r requirements/runtime.txt \
		-r requirements/tests.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch "$(STAMP)"

test: venv
	$(VENV_PY) -m pytest -q tests $(PYTEST_ARGS)

test-quick: venv
	$(VENV_PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(VENV_PY) tools/demo/run_demo.py

clean-venv:
	rm -rf "$(VENV)"
