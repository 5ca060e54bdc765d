"""tracking.py: --log-to tensorboard and wandb (offline), read back with their own readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, make_shard_set, run_cli

from dptrain.common.runfolder import RunFolder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, texture) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("tracking"), texture, 4, 16, (48, 40))


def test_tensorboard_and_wandb_hold_what_the_run_and_its_probe_logged(shards, tmp_path,
                                                                      monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run_cli("pretrain", "--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 2,
            "--out", run, *FAST, "--log-to", "tensorboard", "--log-to", "wandb")
    run_cli("probe", run, "--data", shards, "--test-data", shards, "--name", "self",
            "--repeats", 1, "--device", "cpu", "--no-progress", "--log-to", "tensorboard",
            "--log-to", "wandb")
    rows, epochs = RunFolder(run).read_metrics(), RunFolder(run).read_metrics("epoch")
    summary = json.loads((run / "summary.json").read_text())

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
    assert scalars("train/loss") == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [s for s, _ in scalars("train/lr")] == [r["step"] for r in rows]
    assert scalars("train/top1_epoch") == [(r["step"], pytest.approx(r["top1"]))
                                           for r in epochs]
    assert [r["step"] for r in epochs] == [4, 8]  # 64 images, 16 a step
    assert scalars("summary/train_loss") == [(8, pytest.approx(summary["train_loss"]))]
    assert scalars("probe/self/top1") == [(8, pytest.approx(summary["probe"]["self"]
                                                            ["top1_mean"]))]

    # W&B offline: the run's folder, then the probe's resume of the same W&B run, each read
    # back record by record.
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    train, probe = (wandb_history(r / f"run-{r.name.rsplit('-', 1)[1]}.wandb") for r in runs)
    assert [(s, h["train/loss"]) for s, h in train if "train/loss" in h] == \
        [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [s for s, h in train if "train/top1_epoch" in h] == [4, 8]
    assert [h["probe/self/top1"] for _, h in probe if "probe/self/top1" in h] == \
        [pytest.approx(summary["probe"]["self"]["top1_mean"])]


def wandb_history(path: Path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of each history record of a W&B offline run file: its records in
    W&B's block log (a 7-byte header, then records of crc, length, type in 32 KB blocks, as
    leveldb's log), each parsed by W&B's own protobuf schema."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, history, pos, part = path.read_bytes(), [], 7, b""
    assert data[:6] == b":W&B\xe1\xbe", data[:7]
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last fragment
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                history.append((record.history.step.num,
                                {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                 for i in record.history.item}))
    return history


def test_a_sweeps_points_are_grouped_and_tagged(tmp_path, monkeypatch):
    import wandb

    from dptrain.common import tracking

    seen = {}

    class Run:
        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or Run())
    monkeypatch.setenv(tracking.SWEEP, "grid-a")
    monkeypatch.setenv(tracking.BUDGET, "1000")
    record = {"config": {"classes": 10, "per_class": 100, "seed": 2}, "subset": {}}
    tracking.open_tracker(["wandb"], tmp_path / "K10-n100-s2", record).close()
    assert seen["group"] == "grid-a" and seen["name"] == "K10-n100-s2"
    assert seen["tags"] == ["K=10", "n=100", "seed=2", "N=1000"]


def test_a_missing_backend_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    from dptrain.common.errors import DataError
    from dptrain.common.tracking import open_tracker

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"pip install 'dptrain\[wandb\]'"):
        open_tracker(["wandb"], tmp_path, {"config": {}})
