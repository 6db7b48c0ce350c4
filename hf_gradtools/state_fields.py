"""Checks for the plain values a checkpoint's JSON records hold: each field's type and range, named when wrong.

A file on disk is untrusted input: cut off, edited, or written by something else. Each component that saves a
`state_dict()` reads it back through a `FieldReader`, which raises `StateFieldError` (a `ValueError`) naming the
field (`history[3]`); `read_json_record` reads one file and turns any problem, JSON or field, into one
`DamagedCheckpointError` naming the file and the field (`autoclip.history[3]`).

Example:
    >>> fields = FieldReader({"steps": -1}, "GradientNoiseScale state must be {'steps': int}")
    >>> fields.integer("steps")
    Traceback (most recent call last):
    ...
    hf_gradtools.errors.StateFieldError: GradientNoiseScale state must be {'steps': int}: `steps` must be a non-negative integer, got -1.
"""  # noqa: E501

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from .errors import DamagedCheckpointError, StateFieldError, shown
from .run_folder import inside_run_folder, not_a_regular_file

# The largest finite float32: a value above it (e.g. 1e308) would load into a float32 tensor as inf.
FLOAT32_MAX = 3.4028234663852886e38
# Integers up to 2**53 are exact in a float64 tensor.
FLOAT64_EXACT_INT = 2**53


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class FieldReader:
    """Reads the fields of one saved state (a dict of plain JSON values), refusing a bad one with `StateFieldError`.

    Args:
        state: the state, e.g. one entry of `hf_gradtools_state.json`.
        context: the start of each message, e.g. "AutoClip state must be {'history': [float, ...]}".
    """

    def __init__(self, state: Any, context: str = ""):
        self.context = context
        if not isinstance(state, dict):
            raise StateFieldError("", f"must be a JSON object, got {shown(state)}", context)
        self.state = state
        self._read: set[str] = set()

    def _fail(self, field: str, problem: str):
        raise StateFieldError(field, problem, self.context)

    def _get(self, key: str) -> Any:
        if key not in self.state:
            self._fail(key, "is missing")
        self._read.add(key)
        return self.state[key]

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            self._fail(key, f"must be true or false, got {shown(value)}")
        return value

    def integer(self, key: str, low: int = 0, high: int | None = None, nullable: bool = False) -> int | None:
        """An integer in `[low, high]` (JSON `true`/`1.0` are not integers); `None` allowed with `nullable`."""
        value = self._get(key)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            allowed = (
                f"an integer from {low} to {high}"
                if high is not None
                else ("a non-negative integer" if low == 0 else f"an integer of at least {low}")
            )
            self._fail(key, f"must be {allowed}{' or null' if nullable else ''}, got {shown(value)}")
        return value

    def number(self, key: str, low: float = -math.inf, high: float = math.inf, below_high: bool = False) -> float:
        """A finite number in `[low, high]` (`[low, high)` with `below_high`), as a float."""
        value = self._get(key)
        if not _is_number(value) or not _finite_in(value, low, high, below_high):
            self._fail(key, f"must be {_range_words(low, high, below_high)}, got {shown(value)}")
        return float(value)

    def numbers(self, key: str, low: float = -math.inf, high: float = math.inf, nan: bool = False) -> list[float]:
        """A list of finite numbers in `[low, high]`; with `nan`, NaN is allowed too (a marker, e.g. a lost norm)."""
        values = self._get(key)
        if not isinstance(values, list):
            self._fail(key, f"must be a list of numbers, got {shown(values)}")
        for i, value in enumerate(values):
            if not _is_number(value) or not (_finite_in(value, low, high) or (nan and math.isnan(value))):
                self._fail(
                    f"{key}[{i}]", f"must be {_range_words(low, high)}{' or NaN' if nan else ''}, got {value!r}"
                )
        return [float(v) for v in values]

    def strings(self, key: str) -> list[str]:
        """A list of non-empty strings."""
        values = self._get(key)
        if not isinstance(values, list):
            self._fail(key, f"must be a list of names, got {shown(values)}")
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                self._fail(f"{key}[{i}]", f"must be a non-empty string, got {shown(value)}")
        return list(values)

    def entry(self, key: str, check: Callable[[Any], Any]) -> Any:
        """A nested state, read by its own `check`; a bad field in it is named from here (`key.field`)."""
        value = self._get(key)
        try:
            return check(value)
        except StateFieldError as error:
            raise error.within(key, self.context) from None

    def check(self, ok: bool, key: str, problem: str) -> None:
        """Refuse a combination of fields that the saving code never writes."""
        if not ok:
            self._fail(key, problem)

    def done(self, known: Iterable[str] | None = None) -> None:
        """Refuse a field nobody read: the state holds something this version does not know.

        Args:
            known: the fields the state may hold, for the message (default: those read).
        """
        unknown = sorted(set(self.state) - self._read, key=str)
        if unknown:
            allowed = ", ".join(sorted(self._read if known is None else known))
            self._fail(unknown[0], f"is not a field of this state (it may hold: {allowed})")


def _finite_in(value: float, low: float, high: float, below_high: bool = False) -> bool:
    return math.isfinite(value) and low <= value and (value < high if below_high else value <= high)


def _range_words(low: float, high: float, below_high: bool = False) -> str:
    if low == -math.inf and high == math.inf:
        return "a finite number"
    if high == math.inf:
        return "a non-negative finite number" if low == 0 else f"a finite number of at least {low}"
    if low == 0 and high == FLOAT32_MAX:
        return "a non-negative finite float32 number"
    return f"a number in [{low:g}, {high:g}{')' if below_high else ']'}"


def read_json_record(path: str | os.PathLike, check: Callable[[Any], Any]) -> Any:
    """The JSON file `path`, parsed and passed through `check` (which raises `StateFieldError` on a bad field).

    Raises:
        FileNotFoundError, NotADirectoryError: there is no such file (the caller decides what a missing record
            means).
        OutsideRunFolderError: the file is a link that leads out of its folder (the checkpoint).
        DamagedCheckpointError: the file cannot be read, is not JSON, or `check` refuses a field; one message
            naming the file and the field.
    """
    path = os.fspath(path)
    inside_run_folder(os.path.dirname(path) or ".", path)  # a link out of the checkpoint folder is not read
    if not_a_regular_file(path):  # a pipe would block the read for good
        raise DamagedCheckpointError(f"{path} is not a regular file (a folder, pipe or device). {_WHAT_TO_DO}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise DamagedCheckpointError(
            f"{path} cannot be read ({type(error).__name__}: {error}). {_WHAT_TO_DO}"
        ) from None
    try:
        return check(data)
    except StateFieldError as error:
        where = f"`{error.field}` {error.problem}" if error.field else f"it {error.problem}"
        raise DamagedCheckpointError(
            f"{path} is damaged or was not written by hf_gradtools: {where}. {_WHAT_TO_DO}"
        ) from None


_WHAT_TO_DO = (
    "The checkpoint cannot be resumed from with it: restore the file, or resume from another checkpoint (pass its "
    "folder as `resume_from_checkpoint`)."
)
