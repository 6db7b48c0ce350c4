"""Gradient snapshots: which parameters are frozen, and every N optimizer steps each gradient's norm (and tensors).

| module | what |
|---|---|
| `callback.py` | `GradSnapshotCallback`: records them in a run, on any `Trainer` |
| `files.py` | the files in `output_dir`: written atomically, read back (`load_grad_snapshots`), pruned, discarded |
| `tensors.py` | gradient tensors chosen by `grad_snapshot_tensors`: copied, saved, read back (`load_grad_tensors`) |
"""

from ..run_folder import SNAPSHOT_DIR
from .callback import GradSnapshotCallback
from .files import (
    FROZEN_PARAMETERS_FILE,
    DamagedSnapshotError,
    GradSnapshots,
    describe_parameters,
    discard_grad_snapshots_after,
    load_grad_snapshots,
    prune_grad_snapshots,
    snapshot_folder,
    summary_line,
    tied_parameter_names,
)
from .tensors import (
    TENSOR_SUFFIX,
    DamagedTensorFileError,
    GradTensorCopy,
    GradTensors,
    GradTensorSaver,
    grad_tensor_files,
    grad_tensor_path,
    load_grad_tensors,
)

__all__ = [
    "FROZEN_PARAMETERS_FILE",
    "SNAPSHOT_DIR",
    "TENSOR_SUFFIX",
    "DamagedSnapshotError",
    "DamagedTensorFileError",
    "GradSnapshotCallback",
    "GradSnapshots",
    "GradTensorCopy",
    "GradTensorSaver",
    "GradTensors",
    "describe_parameters",
    "discard_grad_snapshots_after",
    "grad_tensor_files",
    "grad_tensor_path",
    "load_grad_tensors",
    "load_grad_snapshots",
    "prune_grad_snapshots",
    "snapshot_folder",
    "summary_line",
    "tied_parameter_names",
]
