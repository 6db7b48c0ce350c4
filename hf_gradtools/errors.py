"""The package's exceptions. Each subclasses `ValueError`, so callers that catch `ValueError` keep working."""

from __future__ import annotations


class GradToolsError(ValueError):
    """Base class of every error raised by hf_gradtools for bad input."""


class LayerStackNotFoundError(GradToolsError):
    """The model's layer stack or input embeddings could not be found from its structure."""


class NoTrainableParametersError(GradToolsError):
    """Freezing left the model without a single trainable parameter."""


class DamagedCheckpointError(GradToolsError):
    """A file of a checkpoint is not what hf_gradtools writes there (cut off, edited, or from elsewhere): refused
    with the file and the field named, before a resume deletes or loads anything."""
