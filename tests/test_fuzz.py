"""tools/fuzz.py: every saved regression input replayed, and a fixed-seed slice of the
campaign (images through shard's per-file path and the loader's decoders; Hypothesis
mutations of each record file through the commands that read it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("fuzz", ROOT / "tools" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
sys.modules["fuzz"] = fuzz
spec.loader.exec_module(fuzz)

FINDINGS = ("crash", "hang", "traceback", "wrote_on_refusal", "bad_error", "other_exit",
            "harness_error")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    return fuzz.build_fixtures(tmp_path_factory.mktemp("fuzz") / "fixtures")


@pytest.fixture(scope="module")
def worker(fixtures, tmp_path_factory):
    w = fuzz.Worker(fixtures, tmp_path_factory.mktemp("fuzz-log") / "worker.log")
    yield w
    w.stop()


@pytest.mark.parametrize("kind, folder", fuzz.regression_cases(),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_regression_input_is_refused_or_read(kind, folder, worker):
    """A record file that once crashed a command: now exit 0, or one Error line (exit 1 or
    2) with nothing written."""
    answer = worker.run(kind, fuzz.regression_files(folder), timeout=120)
    outcome, each = fuzz.classify(answer)
    assert outcome in ("ok", "refused"), (folder, answer)


def test_image_regression_inputs_are_stored_or_skipped(tmp_path):
    """An image that once crashed or stopped `dptrain shard`: now written, converted or
    skipped with a reason."""
    inputs = sorted((fuzz.REGRESSIONS / "images").glob("*"))
    for path in inputs:
        fate = fuzz.image_case(path.read_bytes(), tmp_path)
        assert fate["outcome"] in ("written", "converted", "skipped"), (path, fate)


# The slice: report renders figures (~2 s a case), so its two record files get fewer cases.
SLICE = {"index.json": 20, "samples.npy": 20, "tar headers": 20, "config.json": 16,
         "checkpoint.pt": 16, "suite TOML": 16, "results.csv": 4, "sweep.json": 4}


def test_fixed_seed_slice_of_the_campaign(tmp_path, fixtures, worker):
    """~300 cases: 180 libFuzzer inputs through shard's per-file path, everything accepted
    decoded by the loader's three paths; 116 Hypothesis mutations of the record files
    through the commands that read them. No crash, hang, traceback or write on refusal."""
    fuzzed = fuzz.run_image_fuzzer(tmp_path / "images", 180, seed=1, workers=1)
    assert len(fuzzed["fates"]) == 180 and not fuzzed["findings"], fuzzed["findings"]
    fates = {f["outcome"] for f in fuzzed["fates"]}
    assert "traceback" not in fates and {"written", "skipped"} <= fates, fates
    decoded = fuzz.decode_all(tmp_path / "images", fuzzed["accepted"], in_process=True)
    assert decoded["sharded"] == decoded["inputs"] > 0, decoded
    for path in ("train", "cache", "eval"):
        d = decoded[path]
        assert d["samples"] == decoded["inputs"] and not (
            d["failed"] or d["crashes"] or d["tracebacks"]), (path, d)
    found: dict = {}
    for kind, cases in SLICE.items():
        counts = fuzz.fuzz_kind(kind, cases, 1, worker, fixtures, 120, found)
        assert counts["cases"] == cases, (kind, counts)
        assert not set(counts["outcomes"]) & set(FINDINGS), (kind, counts, found)
