"""`dptrain verify`: every damaged or missing file named, one verdict, a repair hint, JSON."""

from __future__ import annotations

import json

from conftest import run_cli, run_here

from dptrain.data.index import idx_name


def test_verify_names_each_damaged_file(tmp_path, folder):
    out = tmp_path / "out"
    run_cli("shard", folder, out, "--no-progress", "--shard-size", "0.02")
    assert "OK" in run_cli("verify", out).stdout
    tars = sorted(out.glob("*.tar"))
    data = bytearray(tars[1].read_bytes())
    data[700] ^= 0x01  # one flipped bit inside a JPEG payload
    tars[1].write_bytes(bytes(data))
    tars[2].unlink()
    idx = out / idx_name(tars[3].name)
    idx.write_text(idx.read_text().replace("jpg 512", "jpg 513", 1))
    p = run_cli("verify", out, check=False)
    assert p.returncode == 1
    damaged = [line for line in p.stderr.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 3, p.stderr
    assert tars[1].name in damaged[0] + damaged[1] + damaged[2]
    assert any(tars[2].name in d and "missing" in d for d in damaged)
    assert any(idx.name in d for d in damaged)


def test_verify_checks_table_against_tars(tmp_path, folder):
    import numpy as np

    from dptrain.data.index import sha256_file

    out = tmp_path / "out"
    run_cli("shard", folder, out, "--no-progress")
    # A table that points at the wrong bytes, with its hash updated to hide the change.
    table = np.load(out / "samples.npy")
    table["offset"][3] += 512
    np.save(out / "samples.npy", table)
    meta = json.loads((out / "index.json").read_text())
    meta["samples_sha256"] = sha256_file(out / "samples.npy")
    (out / "index.json").write_text(json.dumps(meta))
    p = run_cli("verify", out, check=False)
    assert p.returncode == 1 and "00000-000.tar: sample 3 at offset" in p.stderr


def test_verify_gives_one_verdict_with_a_hint_and_json(tmp_path, folder):
    out = tmp_path / "out"
    run_cli("shard", folder, out, "--no-progress")
    ok = json.loads(run_cli("verify", out, "--json").stdout)
    assert ok["ok"] is True and ok["problems"] == [] and ok["hint"] is None
    tar = sorted(out.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:-1024])  # cut short
    for damage in ("tar", "samples.npy", "index.json"):  # each: exit 1, never 2
        if damage != "tar":
            (out / damage).unlink()
        p = run_cli("verify", out, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, (damage, p.stderr)
        source = "SRC" if damage == "index.json" else folder.resolve()  # where it was recorded
        assert "DAMAGED" in p.stderr and f"dptrain shard {source} {out} --overwrite" \
            in p.stderr, p.stderr
        j = json.loads(run_cli("verify", out, "--json", check=False).stdout)
        assert j["ok"] is False and j["problems"] and "--overwrite" in j["hint"]
    assert "index.json: missing" in p.stderr
    assert run_cli("verify", tmp_path / "nowhere", check=False).returncode == 2  # usage


def test_verify_flags_a_set_written_before_shard_decoded_and_rotated(tmp_path, texture,
                                                                     monkeypatch):
    """A set written as dptrain wrote them before the decode check (EXIF rotations copied,
    damage inside the compressed data unseen) is DAMAGED, each sample named; written now,
    the same folder verifies OK, with the decoder run or not."""
    from conftest import damaged_jpegs, rotated

    from dptrain.data import images
    from dptrain.data.shards import ShardOptions, shard_dataset

    src = tmp_path / "src"
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for o in range(1, 9):
            (src / f"c{c}" / f"o{o}.jpg").write_bytes(rotated(texture, o, c, o))
    for name, (data, _) in damaged_jpegs(texture).items():
        (src / "c0" / name).write_bytes(data)
    with monkeypatch.context() as old:  # the old writer: no orientation, no decoder
        old.setattr(images, "_conversion_needed", lambda header: None)
        shard_dataset(src, tmp_path / "old", options=ShardOptions(check="header"),
                      progress=False)
    p = run_cli("verify", tmp_path / "old", check=False)
    assert p.returncode == 1
    damaged = [line for line in p.stderr.splitlines() if line.startswith("DAMAGED")]
    assert sum("carries EXIF orientation" in d for d in damaged) == 14  # 2-8 in 2 classes
    assert sum("does not decode in the loader" in d for d in damaged) == 3, p.stderr
    assert all("00000-000.tar" in d for d in damaged if "does not decode" in d)
    assert "dptrain shard" in p.stderr.splitlines()[-1] and "--overwrite" in p.stderr

    out = tmp_path / "new"
    summary = shard_dataset(src, out, progress=False)
    assert summary["written"] == 17 and summary["converted"] == 15  # 14 rotated, 1 repaired
    assert run_cli("verify", out, "--decode").stdout.startswith(f"{out}: OK (")


def test_verify_reports_records_it_cannot_parse_instead_of_crashing(tmp_path, folder):
    """Two crashes the fuzzer found (tools/fuzz.py): an index.json holding JSON that is not an
    object, and a tar header field that is not UTF-8 (its checksum and the index kept true)."""
    from dptrain.data.index import sha256_file

    out = tmp_path / "out"
    run_here("shard", folder, out, "--no-progress", check=True)
    tar = sorted(out.glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[157] = 0x80  # the first member's linkname
    data[148:156] = b"%06o\0 " % (sum(data[:148]) + 8 * 32 + sum(data[156:512]))
    tar.write_bytes(bytes(data))
    meta = json.loads((out / "index.json").read_text())
    meta["tars"][0]["sha256"] = sha256_file(tar)
    (out / "index.json").write_text(json.dumps(meta))
    p = run_here("verify", out)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{tar.name}: sample 0 at offset 512: bad tar header" in p.stderr
    (out / "index.json").write_text("null")
    p = run_here("verify", out)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "DAMAGED" in p.stderr and f"dptrain shard SRC {out} --overwrite" in p.stderr
