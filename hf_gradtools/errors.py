"""The package's exceptions, in one place. Each derives from `GradToolsError`; the errors of bad input (settings,
files on disk, models) also from `ValueError`, and `CheckpointSaveError` from `OSError`, so callers that catch those
keep working.

Example:
    >>> issubclass(DamagedCheckpointError, ValueError), issubclass(CheckpointSaveError, OSError)
    (True, True)
"""

from __future__ import annotations

import os

_SHOWN_CHARS = 80


def shown(value) -> str:
    """`repr(value)`, cut to a readable length for an error message."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 5] + " ...)"


def shown_setting(value) -> str:
    """A setting's value as an error shows it: `shown`, with a hint when it is a string (a quoted JSON number).

    Example:
        >>> shown_setting(0.5), shown_setting("0.5")
        ('0.5', "'0.5' (a string: write numbers and true/false without quotes)")
    """
    if isinstance(value, str):
        return f"{shown(value)} (a string: write numbers and true/false without quotes)"
    return shown(value)


class GradToolsError(Exception):
    """Base class of every error raised by hf_gradtools."""


class LayerStackNotFoundError(GradToolsError, ValueError):
    """The model's layer stack or input embeddings could not be found from its structure."""


class NoTrainableParametersError(GradToolsError, ValueError):
    """Freezing left the model without a single trainable parameter."""


class DamagedCheckpointError(GradToolsError, ValueError):
    """A file of a checkpoint is not what hf_gradtools writes there (cut off, edited, or from elsewhere): refused
    with the file and the field named, before a resume deletes or loads anything."""


class ChangedSettingsError(GradToolsError, ValueError):
    """A run resumes from a checkpoint saved with other freeze settings."""


class CheckpointSaveError(GradToolsError, OSError):
    """A checkpoint save ran out of space. `errno` and `filename` are those of the failed write; the message also
    says that the folder is incomplete, so that resuming skips it."""

    def __init__(self, code: int, filename: str, message: str):
        super().__init__(code, os.strerror(code), filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StateFieldError(GradToolsError, ValueError):
    """A field of a saved state has the wrong type or value.

    Attributes:
        field: where, inside the state (`history[3]`; `""` for the state itself).
        problem: what is wrong (`must be a non-negative integer, got -1`).
    """

    def __init__(self, field: str, problem: str, context: str = ""):
        self.field, self.problem = field, problem
        where = f"`{field}` {problem}" if field else problem
        super().__init__(f"{context}: {where}." if context else f"{where}.")

    def within(self, outer: str, context: str = "") -> StateFieldError:
        """The same error, its field seen from the enclosing state (`autoclip` and `history[3]`)."""
        return StateFieldError(f"{outer}.{self.field}" if self.field else outer, self.problem, context)


class OutsideRunFolderError(GradToolsError, ValueError):
    """A path inside a run folder leads, through a symbolic link, to a place outside it."""


class UnreadableRunFileError(GradToolsError, ValueError):
    """A file of a run folder is not what it should be: a folder or a pipe, not UTF-8, not JSON."""


class DamagedSnapshotError(GradToolsError, ValueError):
    """A `step-*.json` file in the snapshot folder is not a readable snapshot (raised with `strict=True`)."""


class DamagedTensorFileError(GradToolsError, ValueError):
    """A gradient tensor file is not a readable safetensors file of `GradTensorCopy.write`."""


class NonFiniteGradientError(GradToolsError, ValueError):
    """Too many optimizer steps in a row had NaN or Inf gradients; training cannot go on."""


class LossSpikeError(GradToolsError, ValueError):
    """Too many optimizer steps in a row were skipped as loss or gradient spikes (`max_spike_skips`)."""
