"""The errors dptrain reports to a user as one line: bad input (`DataError`, which the CLI
turns into a usage error, exit 2), a run that could not finish (`RunFailed`, exit 1), one a
signal stopped after saving its work (`Stopped`, exit 128 + the signal) and an output it cannot
write (`output_error`, exit 1).
"""

from __future__ import annotations

import errno


class DataError(ValueError):
    """Bad input (paths, options, data): the message says what is wrong and what is allowed."""


class RunFailed(RuntimeError):
    """A command that ran and could not finish (a run whose loss diverged)."""


class Stopped(RuntimeError):
    """A signal stopped the command after it saved its work; the message says how to go on."""

    def __init__(self, message: str, signum: int):
        self.signum = signum
        super().__init__(message)


# What stops a command from writing, which the user fixes outside dptrain; anything else is a
# bug or a lost device, and keeps its traceback.
OUTPUT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EFBIG}


def one_line(e: BaseException) -> tuple[str, int]:
    """What the command line prints for `e`, and its exit status: 2 for bad input (as click's
    usage errors), 1 for a failed run or an output that cannot be written, 128 + the signal
    for a stop. Re-raises anything else, which is a bug and keeps its traceback."""
    if isinstance(e, DataError):
        return f"Error: {printable(str(e))}", 2
    if isinstance(e, RunFailed):
        return f"Error: {printable(str(e))}", 1
    if isinstance(e, Stopped):
        return str(e), 128 + e.signum
    if isinstance(e, KeyboardInterrupt):  # before anything was worth saving, or saved as it went
        return "interrupted: run the same command again to go on", 130
    if isinstance(e, OSError) and e.errno in OUTPUT_ERRORS:  # a full disk, a quota, ...
        return f"Error: {output_error(e)}", 1
    raise e


def printable(text: str) -> str:
    """`text` with what is not printable escaped as Python writes it (a control character, a
    line or paragraph separator read from a damaged file): an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def output_error(e: OSError) -> str:
    """One line for an OSError on output: what, why, and that a rerun resumes (whatever was
    written whole before stays: every file is written under a temporary name and renamed)."""
    what = f" {e.filename}" if e.filename else ""
    verb = "access" if e.errno in (errno.EACCES, errno.EPERM) else "write"
    return (f"cannot {verb}{what}: {e.strerror or e}; fix that and run the same command "
            "again: it goes on from what was finished")


# A schema (mismatch) for a count or a step: an int from 0 that fits the int64 it becomes.
COUNT = (int, lambda v: 0 <= v < 2**63, "0 or more")


def mismatch(value, schema, where: str = "") -> str | None:
    """What is wrong with a record read back from disk, or None: `schema` is a type (or a
    tuple of types; an int is never a bool), {key: schema} for an object with at least those
    keys ("key?": one it may lack), [schema] for a list of such values, or (schema, test,
    what) where the value must also pass `test`. Records are checked before any code indexes
    into them, so a damaged or hand-edited file is reported as what it is instead of failing
    somewhere inside."""
    if isinstance(schema, tuple) and len(schema) == 3 and callable(schema[1]):
        problem = mismatch(value, schema[0], where)
        return problem or (None if schema[1](value) else f"{where} is {value!r}, not {schema[2]}")
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where or 'it'} is {type(value).__name__}, not an object"
        for key, inner in schema.items():
            optional, key = key.endswith("?"), key.rstrip("?")
            name = f"{where}.{key}" if where else key
            if key not in value:
                if optional:
                    continue
                return f"{name} is missing"
            problem = mismatch(value[key], inner, name)
            if problem:
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} is {type(value).__name__}, not a list"
        return next(filter(None, (mismatch(v, schema[0], f"{where}[{i}]")
                                  for i, v in enumerate(value))), None)
    types = schema if isinstance(schema, tuple) else (schema,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        return f"{where} is {type(value).__name__}, not {allowed}"
    return None
