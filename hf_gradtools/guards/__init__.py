"""Guards: optimizer steps that must not be applied, found and skipped by one mechanism (`skip.py`).

| module | what |
|---|---|
| `skip.py` | `StepSkipper`: no update, optimizer-state or scheduler change; the step counts (also on the device) |
| `nonfinite.py` | `NonFiniteGuard`, `SkipNonFinite`: a step whose gradients hold NaN or Inf (`skip_nonfinite_grads`) |
| `spike.py` | `SpikeHistory`, `SkipSpikes`: a step whose loss or gradient norm spikes (`skip_spike_steps`) |
| `spike_device.py` | `DeviceSpikeHistory`: the spike rule's history and thresholds as tensors, never read back |
"""

from .nonfinite import (
    SHOWN_NAMES,
    NonFiniteGradientError,
    NonFiniteGuard,
    SkipNonFinite,
    finite_mask,
    has_nonfinite,
    nonfinite_names,
    norms_nonfinite,
    skip_message,
)
from .skip import (
    StepSkipper,
    device_decision,
    device_skip_blocker,
    has_fresh_state,
    hold_scheduler,
    skip_optimizer_step,
)
from .spike import SkipSpikes, SpikeHistory

__all__ = [
    "SHOWN_NAMES",
    "NonFiniteGradientError",
    "NonFiniteGuard",
    "SkipNonFinite",
    "SkipSpikes",
    "SpikeHistory",
    "finite_mask",
    "has_nonfinite",
    "nonfinite_names",
    "norms_nonfinite",
    "skip_message",
    "StepSkipper",
    "device_decision",
    "device_skip_blocker",
    "has_fresh_state",
    "hold_scheduler",
    "skip_optimizer_step",
]
