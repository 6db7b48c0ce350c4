from .errors import GradToolsError, LayerStackNotFoundError, NoTrainableParametersError
from .freezing import (
    freeze,
    freeze_embeddings,
    freeze_first_n_layers,
    get_frozen_parameters,
    get_trainable_parameters,
    unfreeze,
)
from .layout import LayerStack, find_input_embeddings, find_layer_stack
from .accumulation import count_loss_items, micro_batch_loss_weights
from .clipping import ClipResult, clip_gradients
from .snapshots import GradSnapshotCallback, load_grad_snapshots
from .trainer import GradTrainer
from .training_args import GradTrainingArguments

__version__ = "0.1.0"
