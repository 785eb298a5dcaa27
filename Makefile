# Two commands a new user needs; each sets up its own virtual environment in .venv.
#   make demo   - build the built-in texture set, train, evaluate (CPU, a few minutes)
#   make test   - the test suite
# TORCH picks the torch build: the pinned CPU wheel by default (an unpinned torch pulls
# gigabytes of CUDA packages). On a CUDA machine: make demo TORCH=torch
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-other-cpu clean

$(BIN)/stmae: pyproject.toml research/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[torch,test,lite]"
	$(BIN)/python -m pip install --quiet -e research/
	touch $@

install: $(BIN)/stmae

demo: install
	$(BIN)/stmae demo --out demo_out

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo_out .pytest_cache

# The suite as the other CPU kind runs it (docs/design.md, "Testing on both CPU kinds"):
# the float32 bank search, and oneDNN / MKL kept off AMX.
test-other-cpu: install
	STMAE_BF16_SEARCH=0 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 MKL_ENABLE_INSTRUCTIONS=AVX512 $(BIN)/python -m pytest
