"""Fine-tuning schedules: layer-wise learning-rate decay, gradual unfreezing into a live optimizer, frozen eval mode.

One concept per module:

| module | what |
|---|---|
| `lr_decay.py` | `layerwise_lr_groups`, `param_groups_for`, `layerwise_lr_scales`: optimizer groups whose rate falls with depth |
| `live_groups.py` | `add_param_groups`: new groups in a live optimizer, driven by its `LambdaLR` scheduler |
| `unfreezing.py` | `unfreeze_order`, `GradualUnfreezer`: which block unfreezes when, applied and resumable |
| `eval_mode.py` | `find_frozen_modules`, `set_frozen_eval_mode`: frozen modules stay in eval mode |
| `unfreeze_callback.py` | `GradualUnfreezeCallback`: a `GradualUnfreezer` in a Trainer run, its events logged and recorded |
"""  # noqa: E501

from __future__ import annotations

from ..settings import check_layerwise_lr_decay
from .eval_mode import find_frozen_modules, set_frozen_eval_mode
from .live_groups import add_param_groups
from .lr_decay import (
    GROUP_KEY,
    layerwise_lr_groups,
    layerwise_lr_scales,
    param_groups_for,
)
from .unfreeze_callback import GradualUnfreezeCallback
from .unfreezing import GradualUnfreezer, UnfreezeEvent, unfreeze_order

__all__ = [
    "GROUP_KEY",
    "GradualUnfreezeCallback",
    "GradualUnfreezer",
    "UnfreezeEvent",
    "add_param_groups",
    "check_layerwise_lr_decay",
    "find_frozen_modules",
    "layerwise_lr_groups",
    "layerwise_lr_scales",
    "param_groups_for",
    "set_frozen_eval_mode",
    "unfreeze_order",
]
