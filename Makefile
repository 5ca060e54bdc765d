# Set-up is part of every target: each creates .venv and installs dptrain into it if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := runs/demo
DEMO_EPOCHS := 8

.PHONY: demo test test-slurm bench study clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The whole experiment in miniature on the built-in synthetic data (~5 minutes on 2 CPU cores,
# with installs): build the pool and the downstream tasks, pre-train a small CNN on a
# 100-class x 100-image subset, probe it and a randomly initialised copy on the unseen tasks.
demo: $(STAMP)
	$(PY) tools/make_shards.py --classes 100 --per-class 100
	$(VENV)/bin/dptrain pretrain --classes 100 --per-class 100 --epochs $(DEMO_EPOCHS) --out $(DEMO)
	$(VENV)/bin/dptrain probe $(DEMO) --suite shards/synthetic/suite.toml --random-init

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto  # a worker per core: most tests wait on one-core start-ups

# The Slurm tests (tests/test_slurm.py): a real one-node cluster started here and stopped after
# (tools/slurm_cluster.sh; needs root, installs Debian's Slurm if missing); 6 min on 2 cores,
# 14 with other work keeping them busy (tests/README.md).
test-slurm: $(STAMP)
	$(PY) -m pytest -q -m slurm tests/test_slurm.py

bench: $(STAMP)
	$(PY) benchmarks/shard_write.py
	$(PY) benchmarks/subset_io.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/fill_cost.py
	$(PY) benchmarks/loader_overhead.py
	$(PY) benchmarks/eval_decode.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/probe.py
	$(PY) benchmarks/synthetic.py
	$(PY) benchmarks/predict_fit.py

# The fixed-compute study on the built-in data (docs/synthetic.md): 83 min on 2 bf16 CPU cores,
# ~2 h where the CPU trains in fp32; resumable. Its outputs are committed in docs/study-synthetic/.
study: $(STAMP)
	PY=$(PY) tools/study.sh runs/study

clean:
	rm -rf $(VENV) $(DEMO) shards/synthetic benchmarks/.data

# The fuzzing campaign of issue 33 (tools/fuzz.py, ~40 min on 2 idle cores): every record
# file dptrain reads mutated by Hypothesis (2,000 each), and 10,000 libFuzzer images through shard and the
# loader; results in docs/fuzz/campaign.json, findings shrunk into tests/fuzz_regressions/.
.PHONY: fuzz
fuzz: $(STAMP)
	nice -n 10 $(PY) tools/fuzz.py files --cases 2000 --workers 2 --save-regressions
	nice -n 10 $(PY) tools/fuzz.py images --cases 10000
