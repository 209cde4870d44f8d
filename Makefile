# One command each, on a fresh machine (creates .venv, installs the pinned CPU torch first, then ccam):
#   make demo   -> the whole pipeline on a generated synthetic cohort (runs/demo)
#   make test   -> the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ccam demo --workdir runs/demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
