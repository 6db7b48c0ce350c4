"""A run folder (`output_dir`) is untrusted input: nothing is read, written or deleted through a link that leaves it.

A folder copied from another machine, or shared with other users, can hold symbolic links: `grad_snapshots/` linked
to another folder, `grad_norms.png` or `step-00000010.json` linked to a file elsewhere. Every path the package uses
inside a run folder goes through `inside_run_folder`, which resolves the links (`os.path.realpath`) and refuses,
naming the path, one that ends up outside the folder. A link whose target stays inside is followed as usual. A file
that is written is replaced (a temporary file, then `os.replace`), never written through, so only the folders above
it need to resolve inside; a file that is deleted is unlinked itself, so the same holds. The folder itself may be a
link: what the caller names is trusted, what it holds is not.

`read_run_file` and `read_run_json` read one file of a run folder under that rule (a folder, a pipe or a device
where a file is expected is refused too); `training_args_fields` reads integer fields of the Trainer's
`training_args.bin` from its pickle opcodes, without unpickling it.

Example:
    >>> import os
    >>> os.mkdir("run")
    >>> os.symlink("/etc", "run/grad_snapshots")
    >>> inside_run_folder("run", "run/grad_snapshots/step-00000001.json")  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    hf_gradtools.errors.OutsideRunFolderError: 'run/grad_snapshots/step-00000001.json' leads out of the run
    folder 'run' through a symbolic link (to '/etc/step-00000001.json'): ...
"""

from __future__ import annotations

import io
import json
import math
import os
import pickletools
import stat
import sys
import zipfile
from collections.abc import Iterable
from typing import Any

from .errors import GradToolsError, OutsideRunFolderError, UnreadableRunFileError

SNAPSHOT_DIR = "grad_snapshots"
TRAINING_ARGS_FILE = "training_args.bin"


def is_number(value) -> bool:
    """Whether a value read from JSON is a number (`bool` is not one, though Python counts it as an `int`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The largest count (elements, steps, samples) taken from a run file: integers up to 2**53 are exact as floats, so
# a count in range can be drawn, divided and formatted; 10**400 (which Python's `json` writes as a plain integer)
# cannot even be converted to a float.
MAX_COUNT = 2**53


def is_count(value, low: int = 0, high: int = MAX_COUNT) -> bool:
    """Whether a value read from JSON is an integer in `[low, high]` (not `bool`, not `1.0`)."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def fits_float(value) -> bool:
    """Whether a value read from JSON is a number that converts to a float: any float (NaN and infinities too, which
    `json` reads from `NaN` / `Infinity`), or an integer no larger than the largest float."""
    return is_number(value) and (isinstance(value, float) or abs(value) <= sys.float_info.max)


def is_finite_number(value) -> bool:
    """Whether a value read from JSON is a finite number that converts to a float (`10**400` is not one)."""
    return fits_float(value) and math.isfinite(value)


def not_a_regular_file(path: str | os.PathLike) -> bool:
    """Whether `path` exists (after links) but is not a regular file: a pipe, socket or device would block or
    mislead a reader, a folder fails it. A missing path or a link loop is not this (the caller's open says so)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def is_within(path: str, folder: str) -> bool:
    """Whether the resolved `path` is `folder` or below it (both as `os.path.realpath` gives them)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def inside_run_folder(run_folder: str | os.PathLike, path: str | os.PathLike, *, replaced: bool = False) -> str:
    """`path` (as given), once checked that it stays inside `run_folder` when every symbolic link is followed.

    Args:
        run_folder: the run's `output_dir` (it may itself be a link).
        path: a path inside it, e.g. `os.path.join(run_folder, "grad_snapshots", "step-00000001.json")`.
        replaced: the file at `path` is going to be replaced by a rename or deleted, never opened: a link there is
            replaced or removed, not followed, so only its folder must resolve inside.

    Raises:
        OutsideRunFolderError: `path` leads out of `run_folder`; the message names both and the link's target.
    """
    path = os.fspath(path)
    root = os.path.realpath(run_folder)
    checked = os.path.dirname(os.path.abspath(path)) if replaced else path
    target = os.path.realpath(checked)
    if not is_within(target, root):
        raise OutsideRunFolderError(
            f"{path!r} leads out of the run folder {os.fspath(run_folder)!r} through a symbolic link (to "
            f"{target!r}): hf_gradtools reads, writes and deletes nothing through a link that leaves the run folder. "
            "Replace the link by the file or folder itself, or remove it."
        )
    return path


def locate_snapshots(path: str | os.PathLike) -> tuple[str, str]:
    """`(run folder, snapshot folder)` of `path`: a run's `output_dir`, or one of its snapshot folders.

    `path` holding `grad_snapshots` (a folder, or a link, which is then checked): that is the snapshot folder.
    Otherwise `path` is the snapshot folder; its run folder is the folder above it when it is named
    `grad_snapshots` or `grad_snapshots_<name>` (a named callback's), else `path` itself (a folder of snapshots
    named by the caller).

    Raises:
        OutsideRunFolderError: the snapshot folder leads out of the run folder.
    """
    given = os.fspath(path)
    inner = os.path.join(given, SNAPSHOT_DIR)
    if os.path.lexists(inner):
        run, folder = given, inner
    else:
        name = os.path.basename(given.rstrip(os.sep))
        is_snapshot_dir = name == SNAPSHOT_DIR or name.startswith(SNAPSHOT_DIR + "_")
        run, folder = (os.path.dirname(given.rstrip(os.sep)) or ".", given) if is_snapshot_dir else (given, given)
    inside_run_folder(run, folder)
    return run, folder


def read_run_file(run_folder: str | os.PathLike, path: str | os.PathLike) -> bytes:
    """The bytes of the file `path` in `run_folder`, read without following a link out of it.

    Raises:
        FileNotFoundError: no such file.
        OutsideRunFolderError: `path` leads out of the run folder.
        UnreadableRunFileError: `path` is a folder, a pipe or a device, not a file.
        OSError: it cannot be read (permissions, ...), naming the path.
    """
    path = os.fspath(path)
    inside_run_folder(run_folder, path)
    # Non-blocking: a pipe named like a run file must not hang the reader; it is refused below.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableRunFileError(f"{path!r} is not a file (a folder, a pipe or a device).")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_run_json(run_folder: str | os.PathLike, path: str | os.PathLike) -> Any:
    """The JSON value of the file `path` in `run_folder` (see `read_run_file`).

    Raises:
        UnreadableRunFileError: besides `read_run_file`'s cases, a file that is not UTF-8 or not valid JSON.
    """
    path = os.fspath(path)
    data = read_run_file(run_folder, path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UnreadableRunFileError(f"{path!r} is not UTF-8 text, so not JSON.") from None
    except json.JSONDecodeError as e:
        raise UnreadableRunFileError(
            f"{path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; truncated?)."
        ) from None


_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"}
_INT_OPS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4"}
_MEMO_OPS = {"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"}
_PICKLE_LIMIT = 16 * 2**20  # a pickled TrainingArguments is a few KB


def training_args_fields(run_folder: str | os.PathLike, names: Iterable[str]) -> dict[str, int]:
    """Integer fields of the run's `training_args.bin` (`torch.save` of its `TrainingArguments`), by name.

    The file is never unpickled (that would run whatever code it names): its pickle is only parsed into opcodes
    (`pickletools.genops`), and a field is an attribute-name string followed by an integer. A name found with two
    different values, or not at all, is left out; a missing, foreign or damaged file gives `{}`.

    Example:
        >>> import os, torch
        >>> from transformers import TrainingArguments
        >>> os.mkdir("out")
        >>> torch.save(TrainingArguments("out", gradient_accumulation_steps=2), "out/training_args.bin")
        >>> training_args_fields("out", ["gradient_accumulation_steps", "num_processes"])
        {'gradient_accumulation_steps': 2, 'num_processes': 1}
    """
    wanted = set(names)
    try:
        data = read_run_file(run_folder, os.path.join(os.fspath(run_folder), TRAINING_ARGS_FILE))
        if zipfile.is_zipfile(io.BytesIO(data)):  # torch's zip format: the pickle is `<name>/data.pkl`
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                (member,) = [m for m in archive.infolist() if m.filename.endswith("/data.pkl")]
                if member.file_size > _PICKLE_LIMIT:
                    return {}
                data = archive.read(member)
        found: dict[str, set[int]] = {}
        key = None
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in _MEMO_OPS:
                continue
            if key is not None and opcode.name in _INT_OPS and not isinstance(arg, bool):
                found.setdefault(key, set()).add(int(arg))
            key = arg if opcode.name in _STRING_OPS and arg in wanted else None
    except (OSError, GradToolsError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError):
        return {}
    return {name: values.pop() for name, values in found.items() if len(values) == 1}
