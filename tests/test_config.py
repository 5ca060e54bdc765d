"""config.py: every TrainConfig field is an option, recipes resolve as --print-config shows,
a --config file runs as it is and is checked as the command line is."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import FAST, make_shard_set, run_here


@pytest.fixture(scope="module")
def shards(tmp_path_factory, texture) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("config"), texture, 4, 16, (48, 40))


def test_every_config_field_is_an_option_and_print_config_resolves_it(shards, tmp_path):
    import click

    from dptrain.cli import main
    from dptrain.training.config import TrainConfig

    names = {o.name for o in main.commands["pretrain"].params if isinstance(o, click.Option)}
    assert {f.name for f in fields(TrainConfig)} <= names  # declared once, in config.py
    p = run_here("pretrain", "--data", shards, "--recipe", "paper", "--batch-size", "128",
                 "--min-res", "128", "--bn-wd", "--print-config", check=True)
    cfg = json.loads(p.stdout)
    assert set(cfg) == {f.name for f in fields(TrainConfig)}
    assert cfg["lr"] == pytest.approx(0.2) and cfg["epochs"] == 100  # paper's 0.1 at batch 64
    assert cfg["min_res"] == 128 and cfg["no_bn_wd"] is False and cfg["schedule"] == "cosine"
    assert not (Path("runs") / f"{shards.name}-Kall-nall-s0").exists()  # nothing was run
    # The printed config runs as it is; options given replace its values, with no recipe.
    path = tmp_path / "cfg.json"
    path.write_text(run_here("pretrain", "--data", shards, "--classes", 4, "--per-class", 16,
                             "--epochs", 1, *FAST, "--print-config", check=True).stdout)
    run_here("pretrain", "--config", path, "--batch-size", 32, "--out", tmp_path / "r",
             "--no-progress", check=True)
    ran = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert ran == {**json.loads(path.read_text()), "batch_size": 32}  # lr not rescaled
    path.write_text('{"epochs": 1, "colour": "red"}')
    p = run_here("pretrain", "--config", path)
    assert p.returncode == 2 and "not a pretrain config (['colour'])" in p.stderr


@pytest.mark.parametrize("bad, message", [
    (dict(prefetch=0), "--prefetch must be 1<=x, not 0"),
    (dict(hw_decoder_load=1.5), "--hw-decoder-load must be 0<=x<=1, not 1.5"),
    (dict(label_smoothing=1.0), "--label-smoothing must be 0<=x<1, not 1.0"),
    (dict(lr=0.0), "--lr must be 0<x, not 0.0"),
    (dict(schedule="step"), "--schedule must be one of linear, cosine, not 'step'")])
def test_a_config_file_is_checked_as_the_command_line_is(bad, message):
    """Values from --config skip click's checks: check_config makes the same ones, from the
    same declarations."""
    import re
    from dataclasses import replace

    from dptrain.common.errors import DataError
    from dptrain.training.config import check_config, make_config

    with pytest.raises(DataError, match=re.escape(message)):
        check_config(replace(make_config("synthetic", data="x"), **bad), 1, False)


def test_the_paper_card_is_adam_as_written_and_paper_sgd_is_the_same_with_sgd():
    import torch

    from dptrain.training.config import make_config
    from dptrain.training.train import build

    paper, sgd = make_config("paper", data="x"), make_config("paper-sgd", data="x")
    assert (paper.optimizer, paper.lr, paper.momentum, paper.weight_decay, paper.batch_size,
            paper.epochs, paper.schedule) == ("adam", 0.1, 0.9, 1e-4, 64, 100, "cosine")
    assert {**vars(paper), "optimizer": "sgd", "recipe": "paper-sgd"} == vars(sgd)
    for cfg, kind in ((paper, torch.optim.Adam), (sgd, torch.optim.SGD),
                      (make_config("paper", data="x", optimizer="adamw"), torch.optim.AdamW)):
        _, opt, _, _ = build(cfg.__class__(**{**vars(cfg), "arch": "smallcnn"}), 10, "off",
                             torch.device("cpu"))
        assert type(opt) is kind
        group = opt.param_groups[0]
        assert group["lr"] == 0.1 and group["weight_decay"] == 1e-4
        if kind is not torch.optim.SGD:
            assert group["betas"] == (0.9, 0.999)  # --momentum is Adam's beta1
        else:
            assert group["momentum"] == 0.9


def test_the_built_in_data_gets_its_recipe_unless_another_is_given(tmp_path, folder):
    """A set tools/make_shards.py wrote trains with --recipe synthetic (the ImageNet recipes
    would train its 32 px images at 160-192 px with resnet18); any other set, or a recipe
    given, as before."""
    from dptrain.data.synthetic import Generator, write_pool

    write_pool(tmp_path / "pool", 4, 8, Generator(res=16), progress=False)
    printed = lambda *a: json.loads(run_here("pretrain", *a, "--print-config",  # noqa: E731
                                             check=True).stdout)
    cfg = printed("--data", tmp_path / "pool")
    assert (cfg["recipe"], cfg["arch"], cfg["res"]) == ("synthetic", "smallcnn", 32)
    assert printed("--data", tmp_path / "pool", "--recipe", "fast")["recipe"] == "fast"
    run_here("shard", folder, tmp_path / "photos", "--no-progress", check=True)
    assert printed("--data", tmp_path / "photos")["recipe"] == "fast"
