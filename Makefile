# One command for the main job (`make demo`) and one for the tests (`make test`).
# Both create .venv and install the project on first use; torch is pinned to the CPU wheel.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/icl-retriever

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,dspy,ray,serve]"
	touch $@

demo: install
	$(CLI) demo --index indexes/default --rebuild

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) indexes/default .pytest_cache
