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
	$(PY) -m pip install -q -c constraints.txt -e ".[test,dspy]"
	touch $@

demo: install
	$(CLI) build examples/demos.jsonl --out indexes/default --force
	$(CLI) query indexes/default "Translate 'good night' into German." -k 3
	$(CLI) query indexes/default "Write a limerick about a cat who loves lasagna." -k 3
	$(CLI) query indexes/default "Write a SQL query that lists customers from Spain." -k 3
	$(CLI) query indexes/default "Is this review positive or negative? 'The battery died after two days.'" -k 3

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) indexes/default .pytest_cache
