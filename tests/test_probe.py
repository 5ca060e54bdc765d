"""Linear probes: the solver against known answers and scikit-learn, the cache, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DEVICES, make_shard_set, run_here

import dptrain.probing.logreg as logreg
from dptrain.probing.logreg import fit_logreg, linear_probe


def blobs(rng, n, k, d, spread):
    centers = rng.normal(0, spread, (k, d))
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(0, 1, (n, d)), y


def test_separable_features_reach_100_percent():
    rng = np.random.default_rng(0)
    x, y = blobs(rng, 900, 5, 32, 3.0)
    r = linear_probe(x[:600], y[:600], x[600:], y[600:], repeats=2)
    assert r["top1_mean"] >= 0.99 and r["num_classes"] == 5 and r["feature_dim"] == 32
    assert len(r["repeats"]) == 2 and r["test_samples"] == 300


def test_random_labels_give_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2000, 16)), rng.integers(0, 4, 2000)  # no relation at all
    r = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], repeats=2)
    assert abs(r["top1_mean"] - 0.25) < 0.06


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l2", [1e-2, 1.0, 100.0])
def test_matches_scikit_learn(l2, device):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    x, y = blobs(rng, 900, 5, 32, 0.5)  # overlapping classes: accuracy well below 100%
    scaler = StandardScaler().fit(x[:600])
    xs, xt = scaler.transform(x[:600]), scaler.transform(x[600:])
    ref = LogisticRegression(C=1 / l2, max_iter=10000, tol=1e-8).fit(xs, y[:600])
    w, b = fit_logreg(torch.tensor(xs, dtype=torch.float32, device=device),
                      torch.tensor(y[:600], device=device), 5, l2)[:2]
    w, b = w.cpu(), b.cpu()
    ours = ((torch.tensor(xt, dtype=torch.float32) @ w.T + b).argmax(1).numpy() == y[600:]).mean()
    assert abs(ours - ref.score(xt, y[600:])) <= 0.01
    assert np.abs(ref.coef_ - w.numpy()).max() < 0.1


def test_warm_start_from_a_fit_reuses_its_gradient(monkeypatch):
    """A LinearFit's stored loss and gradient stand in for evaluations: they must be real."""
    rng = np.random.default_rng(3)
    x, y = blobs(rng, 800, 4, 16, 0.5)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    first = fit_logreg(x, y, 4, 1.0)
    calls = []
    real = logreg._cross_entropy
    monkeypatch.setattr(logreg, "_cross_entropy", lambda *a: calls.append(1) or real(*a))
    assert fit_logreg(x, y, 4, 1.0, init=first) is first and not calls  # nothing to do
    warm = fit_logreg(x, y, 4, 300.0, init=first)
    cold = fit_logreg(x, y, 4, 300.0)
    assert (warm.w - cold.w).abs().max() < 1e-2 and (warm.b - cold.b).abs().max() < 1e-2
    flat = torch.arange(len(y)) * 4 + y
    loss, grad_w, grad_b = real(x, flat, warm.w, warm.b)  # the stored evaluation is the final one
    assert torch.allclose(loss, warm.loss) and torch.allclose(grad_w, warm.grad_w, atol=1e-7)
    assert (warm.grad_w + 300.0 / len(y) * warm.w).abs().max() <= 1e-4  # converged


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory, texture):
    root = tmp_path_factory.mktemp("probe")
    train = make_shard_set(root / "train", texture, 4, 12, (48, 40))
    test = make_shard_set(root / "test", texture, 4, 4, (48, 40), classes_from=train)
    other = make_shard_set(root / "other", texture, 3, 4, (48, 40))
    run = root / "run"
    run_here("pretrain", "--data", train, "--epochs", 1, "--batch-size", 16,
             "--res", 32, "--device", "cpu", "--no-progress", "--out", run, check=True)
    return run, {"train": train, "test": test, "other": other}


def test_probe_command_writes_results_and_hits_the_cache(run_and_data):
    run, data = run_and_data
    args = ["probe", run, "--data", data["train"], "--test-data", data["test"],
            "--name", "tiny", "--repeats", 2]
    first = run_here(*args, check=True)
    assert "tiny" in first.stdout and "(0/2 cached)" in first.stdout
    second = run_here(*args, check=True)
    assert "(2/2 cached)" in second.stdout  # no forward pass the second time
    probe = json.loads((run / "probe.json").read_text())["datasets"]["tiny"]
    assert probe["train_samples"] == 48 and probe["test_samples"] == 16
    assert probe["feature_dim"] == 512 and len(probe["repeats"]) == 2
    assert probe["error_mean"] == pytest.approx(1 - probe["top1_mean"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["probe"]["tiny"]["top1_mean"] == probe["top1_mean"]
    cached = {}
    for path in (run / "features").glob("*.npz"):
        with np.load(path) as z:
            assert z["features"].dtype == np.float16 and z["features"].shape[1] == 512
            cached[len(z["labels"])] = (z["features"], z["labels"])
    assert sorted(cached) == [16, 48]
    # The reported accuracy is the solver's, fitted on the train set's features and scored on
    # the test set's, with the command's repeats and seed.
    again = logreg.linear_probe(*cached[48], *cached[16], repeats=2, seed=0)
    assert probe["top1_mean"] == again["top1_mean"]
    assert [(r["l2"], r["test_top1"]) for r in probe["repeats"]] == [
        (r["l2"], r["test_top1"]) for r in again["repeats"]]


def test_suite_file(run_and_data, tmp_path):
    run, data = run_and_data
    suite = tmp_path / "suite.toml"
    suite.write_text(f'[[dataset]]\nname = "from-toml"\ndata = "{data["train"]}"\n'
                     f'test_data = "{data["test"]}"\n')
    p = run_here("probe", run, "--suite", suite, "--repeats", 1, check=True)
    assert "from-toml" in p.stdout and "(2/2 cached)" in p.stdout
    listing = tmp_path / "suite.json"
    listing.write_text(json.dumps([{"data": str(data["train"]), "test_data": str(data["test"])}]))
    default_name = data["train"].name  # a dataset without a name is named by its folder
    p = run_here("probe", run, "--suite", listing, "--repeats", 1, check=True)
    assert f"\n{default_name} " in p.stdout
    assert "from-toml" in json.loads((run / "probe.json").read_text())["datasets"]
    p = run_here("probe", run)
    assert p.returncode == 2 and "--suite" in p.stderr


def test_probe_bad_inputs(run_and_data, tmp_path):
    run, data = run_and_data
    p = run_here("probe", run, "--data", data["train"], "--test-data", data["other"],
                 "--name", "mismatched")
    assert p.returncode == 2 and "classes differ" in p.stderr and "Traceback" not in p.stderr
    not_a_run = tmp_path / "x"
    not_a_run.mkdir()
    p = run_here("probe", not_a_run, "--data", data["train"], "--test-data", data["test"])
    assert p.returncode == 2 and "not a dptrain run" in p.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    p = run_here("probe", bad, "--data", data["train"], "--test-data", data["test"])
    assert p.returncode == 2 and "not a dptrain checkpoint" in p.stderr
    p = run_here("probe", run, "--data", data["train"], "--test-data", data["test"],
                 "--data", data["train"])
    assert p.returncode == 2 and "one --test-data" in p.stderr
    if not torch.cuda.is_available():
        p = run_here("probe", run, "--data", data["train"], "--test-data", data["test"],
                     "--device", "cuda")
        assert p.returncode == 2 and "CUDA is not available" in p.stderr


def test_trained_backbone_beats_random_init(tmp_path):
    """Pre-training on the synthetic pool helps on unseen classes of the same generator."""
    from dptrain.data.synthetic import Generator, write_pool, write_tasks
    from dptrain.probing.downstream import ProbeOptions, read_suite
    from dptrain.probing.probe import probe_run
    from dptrain.training.config import make_config
    from dptrain.training.train import train

    gen = Generator(res=16)  # 16 px: 4x cheaper than the default 32, the same structure
    write_pool(tmp_path / "pretrain", 50, 40, gen, progress=False)
    suite = read_suite(write_tasks(tmp_path, (8,), train=40, test=30, gen=gen, progress=False))
    cfg = make_config("synthetic", data=str(tmp_path / "pretrain"), epochs=8, batch_size=100,
                      res=16)  # 6 epochs: +0.17 and +0.18 over random init (seeds 0, 1; fp32)
    train(cfg, tmp_path / "run", progress=False)
    out = probe_run(tmp_path / "run", suite,
                    ProbeOptions(repeats=2, random_init=True, eval_cache="off"))
    trained = out["datasets"]["synthetic-t1"]["top1_mean"]
    random = out["random_init"]["synthetic-t1"]["top1_mean"]
    assert trained > random + 0.1, (trained, random)


def test_the_dry_runs_solver_time_is_evaluations_of_the_sets_shape(monkeypatch):
    x = torch.randn(200, 16)
    y = torch.randint(0, 4, (200,))
    count = [0]
    fit_logreg(x, y, 4, 1e-3, max_iter=6, tol=0, count=count)
    assert 6 <= count[0] <= 6 * 5 // 4 + 1  # an evaluation per iteration, a few line searches
    # A clock that moves one second per reading: the timed fit took "1 s" for its evaluations
    # (at most 20 iterations' worth), and the plan is 1,000 of them at that cost (no
    # wall-clock bound in a test).
    ticks = iter(range(10**6))
    monkeypatch.setattr(logreg.time, "perf_counter", lambda: float(next(ticks)))
    seconds = logreg.measure_solver(500, 100, 32, 5, iterations=20)
    evaluations = logreg.EVALUATIONS_PER_REPEAT / seconds
    assert evaluations == pytest.approx(round(evaluations)) and 1 <= evaluations <= 26


def test_a_set_probed_again_with_other_settings_is_refused_unless_overwrite(run_and_data):
    run, data = run_and_data
    args = ["probe", run, "--data", data["train"], "--test-data", data["test"], "--name",
            "again", "--no-progress"]
    run_here(*args, "--repeats", 2, check=True)
    before = (run / "probe.json").read_bytes()
    p = run_here(*args, "--repeats", 1)
    assert p.returncode == 2 and "probe.json already holds again, probed with --repeats 2 " \
        "(now 1): add --overwrite to replace it, or give this probe another --name" in p.stderr
    assert (run / "probe.json").read_bytes() == before  # nothing probed, nothing replaced
    run_here(*args, "--repeats", 2, check=True)  # the same settings: a rerun, allowed
    run_here(*args, "--repeats", 1, "--overwrite", check=True)
    assert len(json.loads((run / "probe.json").read_text())["datasets"]["again"]["repeats"]) \
        == 1


def test_weights_that_give_non_finite_features_are_one_line(run_and_data, tmp_path):
    """A checkpoint whose weights overflow the features (a damaged file: the fuzzer set one
    byte of a weight and the solver failed inside L-BFGS; or a run that diverged) is refused
    in one line, and nothing is cached or written."""
    run, data = run_and_data
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.dim() == 4)
    ckpt["model"][first] = ckpt["model"][first] * 1e30
    bad = tmp_path / "huge.pt"
    torch.save(ckpt, bad)
    p = run_here("probe", bad, "--data", data["train"], "--test-data", data["test"],
                 "--feature-cache", tmp_path / "features")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(
        f"huge.pt's weights give non-finite features on {data['train']} (a damaged "
        "checkpoint, or a run that diverged): nothing was probed")
    assert not list((tmp_path / "features").glob("*.npz"))
