"""The folders commands fill, in one place: the layout of a run folder (`RunFolder`) and of a
sweep folder (`SweepFolder`), and the rules every written folder follows. One command writes a
folder at a time (`folder_lock`), a file appears whole or not at all and is on disk once it has
appeared (`atomic_path`), and a folder made with other options is refused unless --overwrite.
So an interrupted command can simply be run again. Checkpoints are written (`save_torch`) and
read (`load_checkpoint`) here too.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import COUNT, DataError, mismatch
from .options import renamed, renamed_argv

PARTIAL = ".partial"  # suffix of files and folders being written
LOCK = ".dptrain.lock"  # in a folder a command writes: who holds it, and its flock


def make_folder(folder: str | os.PathLike) -> Path:
    """`folder`, created with its parents if missing; a path that cannot be a folder is bad
    input, said in one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write to {folder}: {e.strerror or e}") from None
    return folder


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold `folder` for this `dptrain COMMAND` (created if missing) while the block runs: a
    second writer is refused, told who holds it. An flock on FOLDER/.dptrain.lock, so the
    kernel releases it when the holder dies, kill -9 included, and the child processes that
    inherit it hold it as long as they live. The file is never written: a folder's bytes are
    the same whoever wrote it."""
    folder = make_folder(folder)
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(f"cannot write to {folder}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise DataError(f"another {holder} is writing {folder}: wait for it to end, or stop "
                        f"it, then run dptrain {command} again") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock (unless a child still holds it)


def _holder(fd: int) -> str:
    """'dptrain COMMAND (pid P)' of the process holding the flock on `fd`'s file, from Linux's
    /proc/locks, or what is known of it."""
    inode = str(os.fstat(fd).st_ino)
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"
            if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == inode:
                args = Path(f"/proc/{f[4]}/cmdline").read_bytes().decode().split("\0")
                names = [Path(a).name for a in args]
                at = names.index("dptrain") if "dptrain" in names else -1
                command = args[at + 1] if 0 <= at < len(args) - 1 else "command"
                return f"dptrain {command} (pid {f[4]})"
    except (OSError, ValueError):
        pass
    return "dptrain command"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside `path`, this process's own, to write into (a file or a
    folder); flushed to disk and renamed to `path` when the block ends without an error (so a
    power cut leaves the old file or the new one), removed when it fails. `suffix` keeps an
    extension that a writer insists on (numpy's savez appends .npz to any other name)."""
    path = Path(path)
    tmp = partial_path(path, suffix)
    _remove(tmp)  # what an earlier try of this process left
    remove_dead_partials(path.parent, glob.escape(path.name), suffix)
    try:
        yield tmp
        publish(tmp, path)
    except OSError as e:  # a write to an open file names no file: name the one meant
        _remove(tmp)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def partial_path(path: Path, suffix: str = "") -> Path:
    """This process's temporary name for `path`: NAME.PID.partial (+ `suffix`)."""
    return path.with_name(f"{path.name}.{os.getpid()}{PARTIAL}{suffix}")


def remove_dead_partials(folder: Path, names: str = "*", suffix: str = "") -> None:
    """Remove the temporary names (`partial_path`) in `folder` of files matching the glob
    `names` whose writers died, kill -9 included; a live writer's are its own."""
    for old in folder.glob(f"{names}.*{PARTIAL}{suffix}"):
        pid = old.name[:-len(PARTIAL + suffix)].rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(old)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file or folder to `path`, flushed to disk first and its
    folder after, so that a power cut leaves the old file or the new one, whole."""
    for p in (sorted(tmp.rglob("*")) if tmp.is_dir() else []) + [tmp]:
        fsync(p)
    os.replace(tmp, path)
    fsync(path.parent)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk: a rename is durable once its folder is
    synced too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write to a temporary name and rename, so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically: a checkpoint is the old one or the new one, never half.
    Serialised in memory first: torch.save's own writer reports a full disk as a
    RuntimeError without the cause, a plain write as the OSError it is."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


def must_replace(folder: Path, old: dict | None, new: dict, *, overwrite: bool,
                 holds: str) -> bool:
    """Whether `folder`, which holds `old` (the options it was made with; None: nothing of
    ours), must be emptied for `new`: when the options differ. Without --overwrite that is
    refused, naming the options that differ."""
    if old is None:
        return False
    if old != new and not overwrite:
        differ = [k for k in new if old.get(k) != new[k]] or ["unreadable"]
        raise DataError(f"{folder} holds {holds} with other options ({', '.join(differ)} "
                        "differ): use --overwrite to replace it, or another --out")
    return old != new


# What every reader of a checkpoint uses (a run's, or a random init's that probe saves).
CHECKPOINT_SCHEMA = {"config": {"arch": str, "seed": int, "res": int,
                                "eval_res?": (int, type(None))}, "model": dict,
                     "num_classes": (int, lambda v: v >= 1, "1 or more"), "step?": COUNT}


def load_checkpoint(path: str | os.PathLike, device="cpu", schema: dict | None = None) -> dict:
    """A dptrain checkpoint (weights_only: loading runs no code), or a DataError saying the
    file is not one (damaged, truncated, or something else); `schema`: what the caller needs
    of it besides CHECKPOINT_SCHEMA (errors.mismatch)."""
    import torch

    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise DataError(f"{path} is not a dptrain checkpoint ({type(e).__name__})") from None
    problem = mismatch(ckpt, {**CHECKPOINT_SCHEMA, **(schema or {})})
    if problem:
        raise DataError(f"{path} is not a dptrain checkpoint ({problem})")
    return {**ckpt, "config": renamed(ckpt["config"])}  # under today's names


@contextmanager
def restoring(path: str | os.PathLike) -> Iterator[None]:
    """Loading a checkpoint's states into a model, an optimiser, a meter: states that do not
    fit them (other keys, shapes or types: a damaged or foreign file) are refused, naming the
    file, instead of failing inside torch."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path} does not fit this run's model and optimizer "
                        f"({why[:200]})") from None


def read_record(path: Path, overwrite: bool = False, schema: dict | None = None) -> dict | None:
    """A folder's JSON record (None where there is none), with what `schema` says its readers
    use (errors.mismatch). An unreadable one is refused, or None with --overwrite, which will
    replace it."""
    try:
        record = json.loads(path.read_text())
        problem = mismatch(record, schema or {})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        problem = "not JSON"
    if problem is None:
        return record
    if overwrite:
        return None
    raise DataError(f"{path} is not readable JSON ({problem}): use --overwrite to start again, "
                    "or another --out")


class _Folder:
    """A folder a command fills: FOLDER / NAME is a path in it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name


class RunFolder(_Folder):
    """A run's folder: what `pretrain` writes (its config, metrics, checkpoint and summary) and
    `probe` adds (probe.json, the probes' summary, the feature cache)."""

    CONFIG = "config.json"  # the resolved options, the subset and the plan
    METRICS = "metrics.jsonl"  # a row per logged step and per epoch
    CHECKPOINT = "checkpoint.pt"
    SUMMARY = "summary.json"  # the run's figures, and each probe's
    PROBE = "probe.json"  # every probe's full result
    FEATURES = "features"  # the feature cache
    LOG = "sweep.log"  # the commands a sweep ran here, and their output
    LAUNCH = "launch"  # launch-<hash>.json: the config `pretrain --gpus` started torchrun with

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @staticmethod
    def default(data: str, classes: int | None, per_class: int | None, seed: int) -> Path:
        """runs/<data>-K<K>-n<n>-s<seed>: a run's folder when --out is not given."""
        return Path("runs") / f"{Path(data).name}-K{classes or 'all'}-n{per_class or 'all'}-s{seed}"

    # What readers of config.json use (train's resume check, probe, a sweep's results).
    CONFIG_SCHEMA = {"config": {"classes": (int, type(None)), "per_class": (int, type(None)),
                                "seed": int},
                     "subset": dict, "total_steps?": COUNT}

    def read_config(self, overwrite: bool = False) -> dict | None:
        """config.json, its options under today's names (one written before a rename reads
        as a new one: options.RENAMED)."""
        record = read_record(self / self.CONFIG, overwrite, self.CONFIG_SCHEMA)
        return record and {**record, "config": renamed(record["config"])}

    def read_summary(self, overwrite: bool = False) -> dict | None:
        """summary.json, its keys under today's names ("cache" is "pixel_cache")."""
        return renamed(read_record(self / self.SUMMARY, overwrite))

    def read_probe(self) -> dict:
        return read_record(self / self.PROBE) or {}

    def write_config(self, record: dict) -> None:
        write_json(self / self.CONFIG, record)

    def write_probe(self, probe: dict) -> Path:
        write_json(self / self.PROBE, probe)
        return self / self.PROBE

    def write_launch_config(self, config: dict) -> Path:
        """The resolved config `pretrain --gpus` hands its ranks, named by its contents, so
        that two launches into one folder at once cannot read each other's (one of them is
        then refused by the folder's lock)."""
        data = json.dumps(config, indent=1, sort_keys=True).encode()
        path = self / f"{self.LAUNCH}-{hashlib.sha256(data).hexdigest()[:12]}.json"
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return path

    def write_summary(self, summary: dict) -> None:
        write_json(self / self.SUMMARY, summary)

    def update_summary(self, **changes) -> None:
        """Add `changes` to a finished run's summary (a probe's figures); nothing without one."""
        summary = self.read_summary()
        if summary is not None:
            self.write_summary({**summary, **changes})

    def read_metrics(self, kind: str = "step") -> list[dict]:
        """metrics.jsonl's rows of one kind: "step" (a log window: loss, lr, img/s, data wait)
        or "epoch" (mean loss, training top-1, seconds); rows of runs from before the epoch
        rows have no kind and are steps. A row cut short by a kill is left out."""
        rows = []
        try:
            lines = (self / self.METRICS).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path} has no readable {self.METRICS} ({e}): not a dptrain "
                            "run, or one that has not logged a step yet") from None
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row and row.get("kind", "step") == kind:
                rows.append(row)
        return rows

    def open_metrics(self, step: int):
        """metrics.jsonl to append to, cut back to `step` (the checkpoint resumed from): the
        rows a process that died logged after it are logged again by the resumed run."""
        path = self / self.METRICS
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            keep = []
            for line in lines:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (ValueError, KeyError):  # a row cut short by the kill
                    pass
            if keep != lines:
                write_atomic(path, "".join(keep).encode())
        return open(path, "a")

    def finished(self, datasets: list[str] = ()) -> bool:
        """Trained, and probed on every one of `datasets`."""
        try:
            summary = self.read_summary()
        except DataError:
            return False
        return summary is not None and set(datasets) <= set(summary.get("probe", {}))

    def open(self, record: dict, computes, *, overwrite: bool, main: bool) -> dict | None:
        """Prepare the folder for the run `record` describes: refuse one made with other
        options (`computes(record)`: the options that change the result; unless --overwrite,
        which starts it over), keep a checkpoint to resume from, and return the summary of a
        run that finished already (None otherwise). Only the `main` process writes."""
        old = self.read_config(overwrite)
        if (self / self.CONFIG).is_file():
            replace = old is None or must_replace(self.path, computes(old), computes(record),
                                                  overwrite=overwrite, holds="a run")
            if (overwrite or replace) and main:
                for name in (self.CHECKPOINT, self.METRICS, self.SUMMARY):
                    (self / name).unlink(missing_ok=True)
            elif not (overwrite or replace):
                summary = self.read_summary(overwrite)
                if summary is not None:
                    return {**summary, "already_finished": True}
        if main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.write_config(record)
        return None


class SweepFolder(_Folder):
    """A sweep's folder: its spec and resolved pretrain config, a run folder per point
    (runs/K<K>-n<n>-s<seed>), the collected results, the failures, the shared eval cache and
    the report."""

    SPEC = "sweep.json"
    CONFIG = "pretrain.json"  # the resolved pretrain options every point starts from
    RESULTS = "results.csv"
    FAILURES = "failures.json"
    RUNS = "runs"
    CACHE = "cache"  # the eval cache its runs and probes share
    REPORT = "report"
    SUBMITIT = "submitit"

    def run(self, name: str) -> RunFolder:
        return RunFolder(self.path / self.RUNS / name)

    def runs(self) -> list[RunFolder]:
        return [RunFolder(p) for p in sorted((self / self.RUNS).glob("K*-n*-s*"))]

    # What report and predict read of sweep.json (sweep.SweepSpec and the points' budgets).
    SPEC_SCHEMA = {**{f"{k}?": (str, type(None)) for k in ("data", "suite", "recipe", "budget")},
                   "options?": [str], "pretrain_args?": [str], "config?": dict,
                   "repeats?": (int, lambda v: v >= 1, "1 or more"),
                   "points?": [{"run": str, "N": (int, lambda v: v >= 1, "1 or more")}]}

    def read_spec(self) -> dict:
        """sweep.json ({} where there is none); one that is not what a sweep writes is
        refused, naming what is wrong."""
        spec = read_record(self / self.SPEC) or {}
        problem = mismatch(spec, self.SPEC_SCHEMA)
        if problem:
            raise DataError(f"{self / self.SPEC} is not a sweep's record ({problem})")
        # Under today's names, one written before a rename too (options.RENAMED).
        return {**spec, **{k: renamed(spec[k]) for k in ("config",) if k in spec},
                **{k: renamed_argv(spec[k]) for k in ("options", "pretrain_args", "probe_args")
                   if k in spec}}

    def sizes(self) -> dict[str, int]:
        """Each run's budget N, as the sweep that ran it recorded it."""
        return {p["run"]: p["N"] for p in self.read_spec().get("points", [])}
