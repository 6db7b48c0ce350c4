"""hf_gradtools: layer freezing, clipping in any norm, exact gradient accumulation and gradient snapshots for the
Hugging Face Trainer. Swap `Trainer` for `GradTrainer` and `TrainingArguments` for `GradTrainingArguments`."""

from .accumulation import ItemRule, count_items, micro_batch_loss_weights
from .accumulation.loss_probe import probe_loss_normalization
from .checkpoints import (
    ChangedSettingsError,
    CheckpointSaveError,
    last_complete_checkpoint,
    resolve_resume_checkpoint,
)
from .clipping import ClipAlgorithm, ClipResult, clip_gradients, register_clip_algorithm
from .errors import DamagedCheckpointError, GradToolsError, LayerStackNotFoundError, NoTrainableParametersError
from .freezing import (
    freeze,
    freeze_embeddings,
    freeze_first_n_layers,
    get_frozen_parameters,
    get_trainable_parameters,
    unfreeze,
)
from .guards import NonFiniteGradientError
from .layout import LayerStack, find_input_embeddings, find_layer_stack
from .run_folder import OutsideRunFolderError
from .snapshots import (
    DamagedSnapshotError,
    GradSnapshotCallback,
    discard_grad_snapshots_after,
    load_grad_snapshots,
    prune_grad_snapshots,
)
from .snapshots.tensors import DamagedTensorFileError, load_grad_tensors
from .trainer import GradSeq2SeqTrainer, GradTrainer, GradTrainerMixin
from .training_args import GradArgumentsMixin, GradSeq2SeqTrainingArguments, GradTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "ChangedSettingsError",
    "CheckpointSaveError",
    "ClipAlgorithm",
    "ClipResult",
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
    "ItemRule",
    "LayerStack",
    "LayerStackNotFoundError",
    "NoTrainableParametersError",
    "NonFiniteGradientError",
    "OutsideRunFolderError",
    "clip_gradients",
    "count_items",
    "discard_grad_snapshots_after",
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
    "micro_batch_loss_weights",
    "probe_loss_normalization",
    "prune_grad_snapshots",
    "register_clip_algorithm",
    "resolve_resume_checkpoint",
    "unfreeze",
]
