"""`dptrain report` and the results it reads: figures, table, bad and empty results."""

from __future__ import annotations

import csv
import json

from conftest import fake_sweep, run_cli

from dptrain.study.report import write_report
from dptrain.study.results import COLUMNS


def test_report_writes_figures_and_table(tmp_path):
    root = fake_sweep(tmp_path / "sw")
    path = write_report(root)
    text = path.read_text()
    assert "fixed epochs" in text and "## Best split per budget" in text
    for name in ("a", "b", "average"):
        for kind in ("contour", "ratio"):
            png = root / "report" / f"{kind}-{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in text
    # two budgets: the check fits 1,000 alone (5 points: too few for the free fit's 5
    # parameters, which the table says) and predicts 4,000
    assert "## The prediction, checked at N=4,000" in text
    assert "| a | free fit | not fitted: too few points" in text
    one = write_report(fake_sweep(tmp_path / "one", sizes=(1000,))).read_text()
    assert "Needs 2 or more budgets" in one
    table = (root / "report" / "table.md").read_text().splitlines()
    assert len(table) == 2 + 10  # header, rule, one row per (K, n)
    assert "| 1,000 | 4 | 250 |" in table[2] and table[2].count("+-") == 3


def test_report_out_and_format(tmp_path):
    """--out writes the report elsewhere (a sweep on a shared disk is left as it is), --format
    the figures for a paper; a folder that cannot be made is one line."""
    root = fake_sweep(tmp_path / "sw", sets=("a",))
    p = run_cli("report", root, "--out", tmp_path / "mine" / "rep", "--format", "svg")
    text = (tmp_path / "mine" / "rep" / "report.md").read_text()
    svg = tmp_path / "mine" / "rep" / "contour-a.svg"
    assert p.stdout.strip() == f"wrote {tmp_path / 'mine' / 'rep' / 'report.md'}"
    assert b"<svg" in svg.read_bytes()[:500] and "(contour-a.svg)" in text
    assert not (root / "report").exists() and not list((tmp_path / "mine" / "rep").glob(".*"))
    p = run_cli("report", root, "--out", "/proc/no/such", check=False)
    assert p.returncode == 2 and p.stderr.strip() == \
        "Error: cannot write to /proc/no/such: No such file or directory"
    p = run_cli("report", root, "--format", "jpg", check=False)
    assert p.returncode == 2 and "'jpg' is not one of 'png', 'pdf', 'svg'" in p.stderr


def test_a_bad_field_in_results_csv_names_the_row_and_column(tmp_path):
    root = fake_sweep(tmp_path / "sw")
    lines = (root / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[3].split(",")
    cells[header.index("seed")] = ""  # a hand-merged file, say
    lines[3] = ",".join(cells)
    (root / "results.csv").write_text("\n".join(lines) + "\n")
    for cmd in (["report", root], ["predict", root, "--size", "100"]):
        p = run_cli(*cmd, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert "results.csv, line 4, column seed: '' is not an integer" in p.stderr


def test_empty_sweep_is_a_clear_error(tmp_path):
    (tmp_path / "results.csv").write_text(",".join(COLUMNS) + "\n")
    for cmd in (["report", tmp_path], ["predict", tmp_path, "--size", "100"]):
        p = run_cli(*cmd, check=False)
        assert p.returncode == 2 and "no finished run" in p.stderr and "Traceback" not in p.stderr


def test_report_of_a_run_draws_its_curves_and_reprints_its_probes(tmp_path, texture):
    import json

    from conftest import FAST, make_shard_set, run_here
    from PIL import Image

    data = make_shard_set(tmp_path / "d", texture, 3, 16, (48, 40))
    run = tmp_path / "run"
    run_here("pretrain", "--data", data, "--classes", 3, "--per-class", 16, "--epochs", 2,
             "--out", run, *FAST, check=True)
    p = run_here("report", run, check=True)
    assert p.stdout.startswith("no probe yet: dptrain probe")
    png = run / "report" / "curves.png"
    assert Image.open(png).size == (1100, 715)  # 10 x 6.5 in at 110 dpi
    p = run_here("report", run, "--out", tmp_path / "figs", "--format", "pdf", check=True)
    assert (tmp_path / "figs" / "curves.pdf").read_bytes()[:5] == b"%PDF-"
    run_here("probe", run, "--data", data, "--test-data", data, "--name", "self", "--repeats",
             1, "--no-progress", check=True)
    probe = json.loads((run / "probe.json").read_text())["datasets"]["self"]
    p = run_here("report", run, check=True)
    row = next(x for x in p.stdout.splitlines() if x.startswith("self "))
    assert row.split()[1:3] == [f"{probe['top1_mean']:.4f}", f"{probe['top1_std']:.4f}"]
    assert p.stdout.splitlines()[-1] == f"wrote {png}"
    (run / "metrics.jsonl").write_text("")
    p = run_here("report", run)
    assert p.returncode == 2 and "holds no logged step yet" in p.stderr


def test_report_marks_the_splits_it_cannot_tell_from_the_best(tmp_path):
    """A made-up sweep with known ties and gaps. Each seed shifts every split's error alike
    (+-3 points, as a seed's draws do), so only paired differences can see a 2-point gap:
    at N=1,000, 25 x 40 ties 10 x 100 (the best), 4 x 250 (+2 points) and 63 x 15 (+0.5)
    are told apart, 16 x 62 (+0.15 points, 2.6 paired standard errors over 4 seeds) is not
    (Student's t at 3 degrees of freedom asks 3.18), and 100 x 10, run on other seeds
    (unpaired), cannot be told apart. At N=4,000, one seed: nothing can be told."""
    shift = {0: 0.03, 1: -0.03, 2: 0.01, 3: -0.01, 10: 0.02, 11: -0.02}
    wiggle = [0.001, -0.001, 0.001, -0.001]
    runs = [(10, 100, 0.30, [0, 1, 2, 3], [0] * 4), (25, 40, 0.30, [0, 1, 2, 3], wiggle),
            (4, 250, 0.32, [0, 1, 2, 3], wiggle), (63, 15, 0.305, [0, 1, 2, 3], wiggle),
            (16, 62, 0.3015, [0, 1, 2, 3], wiggle),
            (100, 10, 0.30, [10, 11], [0, 0]), (40, 100, 0.25, [0], [0]),
            (100, 40, 0.26, [0], [0])]
    root = tmp_path / "sw"
    root.mkdir()
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for k, n, err, seeds, noise in runs:
            for seed, e in zip(seeds, noise):
                w.writerow({c: 0 for c in COLUMNS} | {
                    "run": f"K{k}-n{n}-s{seed}", "K": k, "n": n, "seed": seed,
                    "N": 1000 if k * n < 2000 else 4000,
                    "dataset": "a", "error_mean": err + shift[seed] + e,
                    "top1_mean": 1 - err, "top1_std": 0.01, "val_top1": ""})
    (root / "sweep.json").write_text(json.dumps({"budget": "fixed steps: 10 per run"}))
    text = write_report(root).read_text()
    section = text.split("## Which splits are as good as the best")[1].split("##")[0]
    rows = {line.split("|")[2].strip(): line.split("|")[3:6]
            for line in section.splitlines() if line.startswith("| a |")}
    best, same, apart = (c.strip() for c in rows["1,000"])
    assert best == "10 x 100"
    assert "25 x 40 (+0.0000 +- 0.0006, paired over 4)" in same and "100 x 10 (" in same
    assert "unpaired" in same.split("100 x 10")[1]
    assert "4 x 250 (+0.0200" in apart and "63 x 15 (+0.0050" in apart
    assert "25 x 40" not in apart and "4 x 250" not in same
    # 2.6 paired standard errors over 4 seeds (3 degrees of freedom): within Student's 3.18
    assert "16 x 62 (+0.0015 +- 0.0006, paired over 4)" in same and "16 x 62" not in apart
    best, same, apart = (c.strip() for c in rows["4,000"])
    assert best == "40 x 100" and "100 x 40 (no se): cannot tell" in same and apart == "-"
    table = (root / "report" / "table.md").read_text()
    bold = {(c[1].strip(), c[2].strip()) for c in (line.split("|") for line in table.splitlines())
            if "**" in c[-2]}
    assert bold == {("1,000", "10"), ("1,000", "25"), ("1,000", "100"), ("1,000", "16"),
                    ("4,000", "40")}
