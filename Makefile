# nitro-llm: every entry point a developer or CI needs. `make test` installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint unit integration venv tiny-model demo bench clean

$(STAMP): pyproject.toml
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

# Speed, memory and agreement of the engines and the whole local stack (about 15 minutes; the
# bloom-560m-shaped model is built once into .bench-cache/). BENCH_ARGS: e.g. --quick, --only.
bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info .pytest_cache .ruff_cache
