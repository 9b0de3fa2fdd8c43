# mmbhvit developer tasks. CI (.ci/run) runs `make test`, then the targets
# marked (CI) below.
#
#   make venv   create $(VENV) and install the pinned stack + mmbhvit (editable)
#   make test   run the test suite (extra pytest options: PYTEST_ARGS=...),
#               in TEST_WORKERS pytest-xdist processes (default 2, one per
#               core here; 0 = in this process), a test file per process
#   make test-quick   the suite without the tests marked `slow` (training
#               runs in subprocesses, torchrun, resume): the edit loop
#   make demo   run tools/demo/run_demo.py
#   make test-kernels   (CI) the kernel core's C++ test: every x86 kernel
#               set forced, and aarch64 (NEON) cross-built, under qemu
#   make test-full-mmcv   (CI) a second virtualenv, $(VENV_MMCV), with
#               full mmcv 2.1.0 (compiled ops) built from source instead of
#               mmcv-lite (once: 43 minutes on 2 shared cores), and the
#               mmseg/mmpretrain integration tests in it
#
# VENV may point elsewhere, e.g. `make venv VENV=/tmp/scratch-venv`; so may
# VENV_MMCV.

PYTHON ?= python3.11
VENV ?= .venv
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
# loadfile: a file's tests stay in one worker, so module fixtures (trained
# demo models, exports) are built once
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

VENV_MMCV ?= .venv-mmcv

VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmbhvit-installed
REQUIREMENTS := requirements/torch.txt requirements/runtime.txt \
	requirements/tests.txt requirements/optional.txt
PIP := $(VENV_PY) -m pip --disable-pip-version-check

VENV_MMCV_PY := $(VENV_MMCV)/bin/python
STAMP_MMCV := $(VENV_MMCV)/.mmbhvit-installed
REQUIREMENTS_MMCV := requirements/torch.txt \
	requirements/runtime-full-mmcv.txt requirements/tests.txt \
	requirements/optional.txt
PIP_MMCV := $(VENV_MMCV_PY) -m pip --disable-pip-version-check
# What test-full-mmcv runs: the compat check and the integration tests that
# go through mmseg and mmpretrain (segmentors built, trained and tested by
# the tools, classifiers, configs, checkpoints, mmseg's own tools).
FULL_MMCV_TESTS ?= tests/test_full_mmcv.py tests/test_compat.py \
	tests/test_segmentation.py tests/test_pretraining.py \
	tests/test_tools.py tests/test_checkpoints.py tests/test_datasets.py \
	tests/test_mmseg_tools.py tests/test_inferencer.py

.PHONY: venv venv-full-mmcv test test-quick test-full-mmcv test-kernels demo \
	clean-venv

venv: $(STAMP)

# $(call make-venv,DIR): create the virtualenv DIR unless it exists.
define make-venv
	@if [ ! -x "$(1)/bin/python" ]; then \
		if command -v "$(PYTHON)" >/dev/null 2>&1; then py="$(PYTHON)"; \
		else echo "$(PYTHON) not found, using python3"; py=python3; fi; \
		echo "creating $(1) with $$py"; \
		"$$py" -m venv "$(1)"; \
	fi
endef

# torch first, on its own (pinned: an unpinned torch pulls a CUDA build),
# then the rest with the torch pins repeated so pip cannot move torch,
# then mmbhvit itself, editable, without touching the pins.
$(STAMP): $(REQUIREMENTS) setup.py setup.cfg
	$(call make-venv,$(VENV))
	$(PIP) install -r requirements/torch.txt
	$(PIP) install -r requirements/torch.txt -r requirements/runtime.txt \
		-r requirements/tests.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch "$(STAMP)"

test: venv
	$(VENV_PY) -m pytest -q tests $(XDIST) --durations=15 $(PYTEST_ARGS)

test-quick: venv
	$(VENV_PY) -m pytest -q tests $(XDIST) -m "not slow" $(PYTEST_ARGS)

venv-full-mmcv: $(STAMP_MMCV)

# As $(STAMP), with full mmcv built from its source distribution against
# that torch before the other pins: setuptools<81 (newer ones break mmcv
# 2.1.0's setup.py), wheel and ninja (parallel compilation) first; mmcv's
# setup.py asks for C++17, torch 2.14's headers need C++20, so the unpacked
# source gets -std=c++20; then mmcv is built without build isolation (the
# build must see torch) and without debug information (CFLAGS=-g0: Python's
# -g makes each of its ~80 torch-heavy files slower to compile). mmbhvit is
# installed with MMBHVIT_NO_EXT=1: it uses the kernels `make venv` built in
# the tree (same torch pins; rebuilding them would overwrite a library that
# $(VENV) may have loaded) or, without them, the pure-PyTorch fallback.
MMCV_VERSION := $(shell sed -n 's/^mmcv==//p' requirements/runtime-full-mmcv.txt)
MMCV_SRC := $(VENV_MMCV)/src/mmcv-$(MMCV_VERSION)
# mmcv is built once per torch/mmcv pins (its own stamp): a change of
# setup.py or of the other pins only reinstalls the rest
MMCV_STAMP := $(VENV_MMCV)/.mmcv-built

$(MMCV_STAMP): requirements/torch.txt requirements/runtime-full-mmcv.txt
	$(call make-venv,$(VENV_MMCV))
	$(PIP_MMCV) install -r requirements/torch.txt
	$(PIP_MMCV) install -r requirements/torch.txt "setuptools<81" wheel \
		ninja==1.13.2
	rm -rf "$(VENV_MMCV)/src" && mkdir -p "$(VENV_MMCV)/src"
	$(PIP_MMCV) download --no-deps --no-build-isolation --no-binary mmcv \
		-d "$(VENV_MMCV)/src" mmcv==$(MMCV_VERSION)
	tar -xzf "$(MMCV_SRC).tar.gz" -C "$(VENV_MMCV)/src"
	sed -i "s/'-std=c++17'/'-std=c++20'/g" "$(MMCV_SRC)/setup.py"
	grep -q "'-std=c++20'" "$(MMCV_SRC)/setup.py"
	PATH="$(abspath $(VENV_MMCV))/bin:$$PATH" CFLAGS="-g0" $(PIP_MMCV) \
		install --no-build-isolation -r requirements/torch.txt \
		"$(abspath $(MMCV_SRC))"
	touch "$(MMCV_STAMP)"

$(STAMP_MMCV): $(MMCV_STAMP) $(REQUIREMENTS_MMCV) setup.py setup.cfg
	$(PIP_MMCV) install -r requirements/torch.txt \
		-r requirements/runtime-full-mmcv.txt -r requirements/tests.txt
	MMBHVIT_NO_EXT=1 $(PIP_MMCV) install --no-deps --no-build-isolation -e .
	@if $(PIP_MMCV) show mmcv-lite >/dev/null 2>&1; then \
		echo "mmcv-lite got into $(VENV_MMCV); it must not"; exit 1; fi
	touch "$(STAMP_MMCV)"

test-full-mmcv: venv-full-mmcv
	$(VENV_MMCV_PY) -m pytest -q $(FULL_MMCV_TESTS) $(XDIST) $(PYTEST_ARGS)

# The kernel core's own C++ test (csrc/Makefile; no Python): built natively
# and run with each x86 kernel set forced in turn (a set this CPU lacks is
# reported "skipped: <set> (<why>)"), then cross-compiled for aarch64 and
# run under qemu user emulation (NEON). Installs the Debian packages it
# needs when they are missing.
KERNEL_SETS_X86 ?= avx512 avx2 popcnt generic
CROSS_PACKAGES := g++-aarch64-linux-gnu qemu-user

test-kernels:
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || \
	    ! command -v qemu-aarch64 >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing $(CROSS_PACKAGES)"; \
		$$sudo apt-get install -y $(CROSS_PACKAGES) || \
		{ $$sudo apt-get update && \
		  $$sudo apt-get install -y $(CROSS_PACKAGES); }; \
	fi
	$(MAKE) -C csrc build/native/test_kernels
	@for s in $(KERNEL_SETS_X86); do \
		csrc/build/native/test_kernels --sets $$s; rc=$$?; \
		if [ $$rc -ne 0 ] && [ $$rc -ne 2 ]; then exit $$rc; fi; \
	done
	$(MAKE) -C csrc test-aarch64

demo: venv
	$(VENV_PY) tools/demo/run_demo.py

clean-venv:
	rm -rf "$(VENV)" "$(VENV_MMCV)"
