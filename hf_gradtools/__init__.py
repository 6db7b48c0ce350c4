"""hf_gradtools: layer freezing, clipping in any norm, exact gradient accumulation and gradient snapshots for the
Hugging Face Trainer. Swap `Trainer` for `GradTrainer` and `TrainingArguments` for `GradTrainingArguments`.

What is exported here is what a user calls; the building blocks live in their folders (see the README's layout).
"""

from .checkpoints import last_complete_checkpoint
from .clipping import ClipAlgorithm, clip_gradients, register_clip_algorithm
from .components import ClipStep, TrainerComponent
from .errors import (
    ChangedSettingsError,
    CheckpointSaveError,
    DamagedCheckpointError,
    DamagedSnapshotError,
    DamagedTensorFileError,
    GradToolsError,
    LayerStackNotFoundError,
    LossSpikeError,
    NonFiniteGradientError,
    NoTrainableParametersError,
    OutsideRunFolderError,
    StateFieldError,
    UnreadableRunFileError,
)
from .freezing import (
    freeze,
    freeze_embeddings,
    freeze_first_n_layers,
    get_frozen_parameters,
    get_trainable_parameters,
    unfreeze,
)
from .layout import find_input_embeddings, find_layer_stack
from .snapshots import GradSnapshotCallback, load_grad_snapshots, load_grad_tensors, prune_grad_snapshots
from .trainer import GradSeq2SeqTrainer, GradTrainer, GradTrainerMixin
from .training_args import GradArgumentsMixin, GradSeq2SeqTrainingArguments, GradTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "ChangedSettingsError",
    "CheckpointSaveError",
    "ClipAlgorithm",
    "ClipStep",
    "DamagedCheckpointError",
    "DamagedSnapshotError",
    "DamagedTensorFileError",
    "GradArgumentsMixin",
    "GradSeq2SeqTrainer",
    "GradSeq2SeqTrainingArguments",
    "GradSnapshotCallback",
    "GradToolsError",
    "GradTrainer",
    "GradTrainerMixin",
    "GradTrainingArguments",
    "LayerStackNotFoundError",
    "LossSpikeError",
    "NoTrainableParametersError",
    "NonFiniteGradientError",
    "OutsideRunFolderError",
    "StateFieldError",
    "TrainerComponent",
    "UnreadableRunFileError",
    "clip_gradients",
    "find_input_embeddings",
    "find_layer_stack",
    "freeze",
    "freeze_embeddings",
    "freeze_first_n_layers",
    "get_frozen_parameters",
    "get_trainable_parameters",
    "last_complete_checkpoint",
    "load_grad_snapshots",
    "load_grad_tensors",
    "prune_grad_snapshots",
    "register_clip_algorithm",
    "unfreeze",
]
