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

# Generate small ImageNet-like train and val JPEG folders, shard them, check them, then
# pre-train briefly on a 10-class x 40-image subset and report val top-1 (~1 minute).
demo: $(STAMP)
	$(PY) tools/make_images.py $(DEMO)/images --classes 20 --per-class 40
	$(PY) tools/make_images.py $(DEMO)/val-images --classes 20 --per-class 10 --start 1000
	$(VENV)/bin/dptrain shard $(DEMO)/images $(DEMO)/train
	$(VENV)/bin/dptrain shard $(DEMO)/val-images $(DEMO)/val --classes-from $(DEMO)/train
	$(VENV)/bin/dptrain verify $(DEMO)/train
	$(VENV)/bin/dptrain info $(DEMO)/train
	$(VENV)/bin/dptrain pretrain --data $(DEMO)/train --val-data $(DEMO)/val --classes 10 \
	    --per-class 40 --epochs 4 --batch-size 32 --res 64 --log-every 5 --out $(DEMO)/run

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/shard_write.py
	$(PY) benchmarks/subset_io.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/probe.py

clean:
	rm -rf $(VENV) $(DEMO) benchmarks/.data
