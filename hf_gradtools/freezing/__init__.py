"""Freezing: by hand, from the settings, and automatically as training goes.

| module | what |
|---|---|
| `functions.py` | `freeze`, `unfreeze`, `freeze_embeddings`, `freeze_first_n_layers`; `apply_freezing` (settings) |
| `auto.py` | `AutoFreeze`: freeze the leading blocks once their gradient norms stop changing (`auto_freeze`) |
| `activation_cache.py` | `FrozenActivationCache`: the frozen prefix's outputs kept per example and served again |
"""

from .activation_cache import CacheFrozenActivations, FrozenActivationCache, check_activation_cache, frozen_prefix
from .auto import AutoFreeze, blocks_to_freeze, check_auto_freeze
from .functions import (
    apply_freezing,
    check_something_to_train,
    freeze,
    freeze_embeddings,
    freeze_first_n_layers,
    frozen_by_settings,
    get_frozen_parameters,
    get_trainable_parameters,
    has_frozen_parameters,
    restore_requires_grad,
    unfreeze,
)

__all__ = [
    "CacheFrozenActivations",
    "FrozenActivationCache",
    "check_activation_cache",
    "frozen_prefix",
    "AutoFreeze",
    "blocks_to_freeze",
    "check_auto_freeze",
    "apply_freezing",
    "check_something_to_train",
    "freeze",
    "freeze_embeddings",
    "freeze_first_n_layers",
    "frozen_by_settings",
    "get_frozen_parameters",
    "get_trainable_parameters",
    "has_frozen_parameters",
    "restore_requires_grad",
    "unfreeze",
]
