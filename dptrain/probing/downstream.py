"""What a probe runs on and how: the downstream sets (`--data/--test-data/--name`, or a
`--suite` file of them) and `dptrain probe`'s options. No torch here: `--help` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import DataError, mismatch
from ..common.options import option
from ..common.tracking import BACKENDS


@dataclass(frozen=True)
class ProbeOptions:
    """`dptrain probe`'s options."""

    data: tuple = option((), "Downstream train shards; repeat with --test-data and --name per "
                         "dataset.", path="dir", multiple=True)
    test_data: tuple = option((), "Its test shards (sharded with --classes-from the train "
                              "shards).", path="dir", multiple=True)
    names: tuple = option((), "Its name [the train shards' folder name].", flag="--name",
                          multiple=True)
    suite: str | None = option(None, "TOML/JSON file of datasets: [[dataset]] name, data, "
                               "test_data.", path="file")
    res: int | None = option(None, "Feature resolution [pre-training's].", low=16)
    repeats: int = option(5, "Probes per dataset, each with another validation split.", low=1)
    val_fraction: float = option(0.2, "Part of train held out to choose the L2 strength.",
                                 low=0, high=1, low_open=True, high_open=True)
    # No --cache alias: pretrain's --cache was its pixel cache's mode (auto|gpu|host|off), and
    # `probe --cache off` made a folder named off.
    feature_cache: str | None = option(None, "Folder of the feature cache [RUN/features].",
                                       path="out")
    eval_cache: str | None = option(None, "Folder of the eval cache: each downstream set's "
                                    "images, decoded and resized once, for every probe "
                                    "[$XDG_CACHE_HOME/dptrain or ~/.cache/dptrain; off: decode "
                                    "every time].")
    device: str = option("auto", "Where features are computed; auto: the GPU when there is "
                         "one.", choices=("auto", "cpu", "cuda"))
    workers: int | None = option(None, "DALI threads for feature extraction [this process's "
                                 "share of the cores].", low=1)
    seed: int = option(0, "Seeds the validation splits.")
    random_init: bool = option(False, "Also probe the same architecture as initialised (the "
                               "reference any pre-training must beat) and print both.")
    allow_unfinished: bool = option(False, "Probe a run whose checkpoint is short of its "
                                    "planned steps (refused otherwise).")
    overwrite: bool = option(False, "Replace a set's earlier result probed with other "
                             "settings (refused otherwise: probe.json keeps one per --name).")
    log_to: tuple = option((), "Also log the results to the run's TensorBoard or W&B run (as "
                           "pretrain --log-to).", choices=BACKENDS,
                           multiple=True)


def read_suite(path: Path) -> list[tuple[str, str, str]]:
    """Downstream sets from a TOML or JSON file: `[[dataset]]` tables (TOML) or a list (JSON)
    of {name, data, test_data}; relative paths are relative to the file."""
    import tomllib

    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read suite {path}: {e}") from None
    entries = doc if isinstance(doc, list) else doc.get("dataset", doc.get("datasets"))
    if not isinstance(entries, list) or not entries:
        raise DataError(f"suite {path} lists no dataset: expected [[dataset]] entries with "
                        "name, data and test_data")
    out = []
    allowed = ("name", "data", "test_data")
    for e in entries:
        if not isinstance(e, dict):
            raise DataError(f"suite {path}: each dataset needs data and test_data: {e!r}")
        unknown = sorted(set(e) - set(allowed))  # first: a misspelt key is why one is missing
        missing = [k for k in ("data", "test_data") if k not in e]
        if unknown:
            raise DataError(f"suite {path}: unknown key(s) {', '.join(unknown)} in {e!r}; a "
                            f"dataset takes {', '.join(allowed)}"
                            + (f" ({', '.join(missing)} missing)" if missing else ""))
        if missing:
            raise DataError(f"suite {path}: each dataset needs data and test_data: {e!r} has "
                            f"no {' and no '.join(missing)}")
        problem = mismatch(e, {"data": str, "test_data": str, "name?": str})
        if problem:
            raise DataError(f"suite {path}: {problem} in {e!r}; data and test_data are paths, "
                            "name a text")
        train, test = (str((path.parent / e[k]).resolve()) for k in ("data", "test_data"))
        out.append((str(e.get("name") or Path(train).name), train, test))
    return out


def downstream_sets(train_data: list[str], test_data: list[str], names: list[str],
                    suite: Path | None) -> list[tuple[str, str, str]]:
    """(name, train shards, test shards) from `probe`'s --data/--test-data/--name and --suite."""
    if len(train_data) != len(test_data) or (names and len(names) != len(train_data)):
        raise DataError("give one --test-data (and one --name, if any) per --data")
    datasets = list(zip(names or [Path(d).name for d in train_data], train_data, test_data))
    datasets += read_suite(suite) if suite else []
    if not datasets:
        raise DataError("no downstream dataset: give --data and --test-data, or --suite FILE")
    names = [d[0] for d in datasets]
    if len(set(names)) != len(names):
        raise DataError(f"dataset names must differ: {', '.join(names)} (use --name)")
    return datasets
