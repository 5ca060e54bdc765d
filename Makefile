# Set-up is part of every target: each creates .venv and installs dptrain into it if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := shards/demo

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Until the trainer lands: generate a small ImageNet-like JPEG folder, shard it, verify, show it.
demo: $(STAMP)
	$(PY) tools/make_images.py $(DEMO)/images --classes 20 --per-class 40
	$(VENV)/bin/dptrain shard $(DEMO)/images $(DEMO)/train
	$(VENV)/bin/dptrain verify $(DEMO)/train
	$(VENV)/bin/dptrain info $(DEMO)/train

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/shard_write.py
	$(PY) benchmarks/subset_io.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(DEMO) benchmarks/.data
