# Set-up and entry points. Every target creates the virtual environment it needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test serve samples clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build on local disk; otherwise pip pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

## demo: read the bundled LoRAs (and ../shared/loras if present), compare, say where things are
demo: $(STAMP)
	$(PY) scripts/demo.py

## test: the whole test suite (real-world suite reads ../shared/loras)
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## samples: regenerate data/samples (tiny LoRAs in several real formats)
samples: $(STAMP)
	$(PY) scripts/make_samples.py --out data/samples

## serve: the HTTP API and web page on http://127.0.0.1:8000 over DB (default: the demo's store)
DB ?= demo-out/db
serve: $(STAMP)
	@test -f $(DB)/lorasearch.sqlite || $(MAKE) demo
	$(VENV)/bin/lorasearch serve --db $(DB)

clean-venv:
	rm -rf $(VENV)
