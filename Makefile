# `make bench` and `make test` set everything up themselves on a fresh machine: a
# virtual environment in .venv, torch, the build of the extension, then the job. Each
# phase says what it does in one line; pip's and the build's own output go to a log in
# .venv, whose end is printed if the phase fails.
# TORCH picks the torch to install (default: 2.13.0, a CPU build where a CPU wheel is
# what pip finds); e.g. `make bench TORCH=torch==2.14.1` for a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
SOURCES := $(wildcard Makefile setup.py pyproject.toml csrc/*.* csrc/cpu/*.* csrc/cuda/*.*)

# $(call logged,COMMAND,LOG): COMMAND's output into LOG; on failure, the compiler's errors
# in it (pip prints them mid-log, under its own traceback) and its last lines.
logged = $(1) > $(2) 2>&1 || { grep -E -A5 ': (fatal )?error:' $(2) | head -n 40; tail -n 25 $(2); \
	echo "make: that failed; all of its output is in $(2)"; exit 1; }

.PHONY: bench test test-isa clean

$(VENV)/.built: $(SOURCES)
	@if test -x $(PY); then echo "make: [venv] using $(VENV)"; \
	else echo "make: [venv] creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); fi
	@echo "make: [torch] pip install $(TORCH) and the tools (numpy, pytest, matplotlib, onnxruntime...), log in $(VENV)/pip.log; minutes the first time"
	@$(call logged,$(PY) -m pip install "$(TORCH)" ninja pybind11 numpy pytest hypothesis tqdm \
		matplotlib "setuptools>=64" wheel onnx onnxscript onnxruntime,$(VENV)/pip.log)
	@echo "make: [build] compiling the extension (pip install -e .), log in $(VENV)/build.log; a few minutes on 2 cores"
	@$(call logged,$(PY) -m pip install -v --no-build-isolation --no-deps -e .,$(VENV)/build.log)
	@touch $@

bench: $(VENV)/.built
	@echo "make: [run] python benchmarks/run.py $(ARGS)"
	@$(PY) benchmarks/run.py $(ARGS)

test: $(VENV)/.built
	@echo "make: [run] pytest tests $(ARGS)"
	@$(PY) -m pytest -q $(ARGS) tests

# The kernel tests again under each CPU kernel variant below this machine's best.
test-isa: $(VENV)/.built
	PYTHON=$(PY) bash .ci/cpu_variants.sh

clean:
	rm -rf $(VENV) build fused_lstm/*.so *.egg-info
