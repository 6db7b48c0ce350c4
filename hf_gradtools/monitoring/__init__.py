"""What the gradients say while training runs: per-layer norms and the gradient noise scale.

| module | what |
|---|---|
| `layer_norms.py` | `LayerNormGrouper`: per-layer-group norms for the logs; the parameters that got no gradient |
| `noise_scale.py` | `GradientNoiseScale`, `WindowNoiseMeter`: the critical batch size of McCandlish et al. 2018 |
"""

from .layer_norms import (
    LOG_PREFIX,
    LayerNormGrouper,
    LayerNormsLog,
    log_key,
    no_grad_warning,
    parameters_without_grad,
)
from .noise_scale import (
    GradientNoiseScale,
    NoiseScale,
    NoiseScaleLog,
    WindowNoiseMeter,
    exact_noise_scale,
    micro_batch_sq_norm,
)

__all__ = [
    "LOG_PREFIX",
    "GradientNoiseScale",
    "LayerNormGrouper",
    "LayerNormsLog",
    "NoiseScale",
    "NoiseScaleLog",
    "WindowNoiseMeter",
    "exact_noise_scale",
    "log_key",
    "micro_batch_sq_norm",
    "no_grad_warning",
    "parameters_without_grad",
]
