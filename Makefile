# `make bench` and `make test` set everything up themselves on a fresh machine: a
# virtual environment in .venv, torch, the build of the extension, then the job.
# TORCH picks the torch to install (default: 2.13.0, a CPU build where a CPU wheel is
# what pip finds); e.g. `make bench TORCH=torch==2.14.1` for a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
SOURCES := $(wildcard Makefile setup.py pyproject.toml csrc/*.* csrc/cpu/*.* csrc/cuda/*.*)

.PHONY: bench test test-isa clean

$(VENV)/.built: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" ninja pybind11 numpy pytest hypothesis tqdm matplotlib \
		"setuptools>=64" wheel onnx onnxscript onnxruntime
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

bench: $(VENV)/.built
	$(PY) benchmarks/run.py $(ARGS)

test: $(VENV)/.built
	$(PY) -m pytest -q $(ARGS) tests

# The kernel tests again under each CPU kernel variant below this machine's best.
test-isa: $(VENV)/.built
	PYTHON=$(PY) bash .ci/cpu_variants.sh

clean:
	rm -rf $(VENV) build fused_lstm/*.so *.egg-info
