# nitro-llm: every entry point a developer or CI needs. `make test` installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint unit integration venv tiny-model demo bench clean

# setup.py and the C file: `pip install -e .` compiles the fast engine's int8 kernel in place.
$(STAMP): pyproject.toml setup.py enclave/_int8mm.c
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing nitro-llm and its test extras into $(VENV) (first run: about 2 minutes)"
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tiny trained BLOOM the tests share, built once (rebuilt when its recipe changes) outside
# pytest, so that no test's timeout pays for it. Built aside and renamed: never half a model.
TINY_MODEL := .cache/tiny-model
$(TINY_MODEL)/config.json: $(STAMP) emulator/tiny_model.py emulator/data/benefits_faq.txt \
		scripts/save_model.py enclave/fast_engine.py
	@echo "building the tiny test model into $(TINY_MODEL) (about half a minute, once)"
	@rm -rf $(TINY_MODEL) $(TINY_MODEL).partial
	$(BIN)/python scripts/save_model.py --tiny $(TINY_MODEL).partial
	@mv $(TINY_MODEL).partial $(TINY_MODEL)

tiny-model: $(TINY_MODEL)/config.json

test: lint $(TINY_MODEL)/config.json
	NITRO_TINY_MODEL=$(abspath $(TINY_MODEL)) $(BIN)/pytest -q -ra

unit: $(TINY_MODEL)/config.json
	NITRO_TINY_MODEL=$(abspath $(TINY_MODEL)) $(BIN)/pytest -q -m "not integration"

integration: $(TINY_MODEL)/config.json
	NITRO_TINY_MODEL=$(abspath $(TINY_MODEL)) $(BIN)/pytest -q -m integration

demo: $(STAMP)
	BIN=$(BIN) bash scripts/demo.sh

# The malicious parent alone (tests/adversarial; part of `make test` too): a relay where the
# proxy sits replays, reorders, swaps, forges and lies; each case must fail with its exact code.
.PHONY: adversarial
adversarial: $(TINY_MODEL)/config.json
	NITRO_TINY_MODEL=$(abspath $(TINY_MODEL)) $(BIN)/pytest -q -ra tests/adversarial

# Speed, memory and agreement of the engines and the whole local stack (about 15 minutes; the
# bloom-560m-shaped model is built once into .bench-cache/). BENCH_ARGS: e.g. --quick, --only.
bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# N concurrent clients for T seconds through the whole local stack on the tiny model: cross-talk,
# errors by code, latency, tokens/s, memory; writes load-results.json, exits 1 on a missed target.
# LOAD_ARGS: e.g. --clients 32 --duration 120.
.PHONY: load
load: $(TINY_MODEL)/config.json
	$(BIN)/python scripts/load.py --model-dir $(TINY_MODEL) $(LOAD_ARGS)

# The enclave image built for real and asked one question (scripts/image_test.sh: installs docker.io
# and debootstrap as root if missing, starts dockerd if none runs; about 25 minutes on a fresh
# machine, 8-10 warm). Prints image sizes, build times, the enclave memory
# by the 4x rule and whether two builds match (docs/reproducibility.md).
.PHONY: image-test
image-test: $(TINY_MODEL)/config.json
	NITRO_TINY_MODEL=$(abspath $(TINY_MODEL)) PY=$(abspath $(BIN)/python) bash scripts/image_test.sh

clean:
	rm -rf $(VENV) .cache build *.egg-info .pytest_cache .ruff_cache
