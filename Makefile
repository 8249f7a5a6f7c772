# One command for the main job (`make demo`) and one for the tests (`make test`).
# Both create .venv and install the project on first use; torch is pinned to the CPU wheel.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/icl-retriever

.PHONY: install demo test docs docs-serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,dspy,ray,llamaindex,haystack,docs,serve]"
	touch $@

demo: install
	$(CLI) demo --index indexes/default --rebuild

test: install
	$(PY) -m pytest -q

# The documentation site into site/ (warnings are errors), and a local preview with live reload.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) indexes/default .pytest_cache site
