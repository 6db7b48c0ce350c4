"""Per-layer gradient norms for the Trainer's logs, and the report of parameters that received no gradient.

Each parameter belongs to one group: `embeddings` (the input embedding block of `find_input_embeddings`),
`layer <i>` (block `i` of `find_layer_stack`), or `head` (everything else: task head, pooler, final norms). A
group's norm is the norm, in the same norm type, of its parameters' norms: the norm of the group's gradient taken
as one vector (for `inf`, the largest). `LayerNormGrouper` maps names to groups once; each step is then a few
segment reductions on the device over the per-parameter norms that clipping already computed.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=8, vocab_size=10))
    >>> names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight",
    ...     "bert.encoder.layer.1.output.dense.bias", "classifier.weight"]
    >>> grouper = LayerNormGrouper(model, names)
    >>> grouper.logs(torch.tensor([1.0, 3.0, 4.0, 2.0]), norm_type=2.0)
    {'grad_norm/embeddings': 1.0, 'grad_norm/layer.1': 5.0, 'grad_norm/head': 2.0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..clipping import check_norm_type, clip_coefficient
from ..components import ClipStep, TrainerComponent
from ..layout import group_order, model_layout, parameter_group

LOG_PREFIX = "grad_norm/"
# How many names the no-gradient warning lists.
SHOWN_NAMES = 10


def log_key(group: str) -> str:
    """`"layer.3"` -> `"grad_norm/layer.3"`, `"head"` -> `"grad_norm/head"`."""
    return LOG_PREFIX + group


class LayerNormGrouper:
    """Combines per-parameter gradient norms into per-group norms with segment reductions on the device.

    Args:
        model: the model the names belong to (for its layer stack and embeddings; a model without them simply has
            no `layer.<i>` or `embeddings` group).
        names: the parameter names, in the order of the per-parameter norms it will be given (as
            `clip_gradients(...).param_norms`: the parameters that have a gradient). Build a new grouper if that
            set changes.

    Attributes:
        groups: the groups present, in order (`"embeddings"`, `"layer.0"`, ..., `"head"`).
        keys: their log keys (`"grad_norm/embeddings"`, `"grad_norm/layer.0"`, ..., `"grad_norm/head"`).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        stack, embeddings = model_layout(model)
        of_name = [parameter_group(name, stack, embeddings) for name in names]
        self.names = list(names)
        self.groups = sorted(set(of_name), key=group_order)
        self.keys = [log_key(group) for group in self.groups]
        position = {group: i for i, group in enumerate(self.groups)}
        self._index = {torch.device("cpu"): torch.tensor([position[g] for g in of_name], dtype=torch.long)}

    def _index_on(self, device: torch.device) -> torch.Tensor:
        # Copied to a device once, then reused: no host-to-device copy per step.
        if device not in self._index:
            self._index[device] = self._index[torch.device("cpu")].to(device)
        return self._index[device]

    def group_norms(self, param_norms: torch.Tensor, norm_type: float | str = 2.0) -> torch.Tensor:
        """The norm of each group (in `groups` order), a float32 1-D tensor on `param_norms`' device; no sync.

        Args:
            param_norms: 1-D, one `norm_type` norm per name given at construction, in that order.
            norm_type: the norm type of `param_norms`; any positive number or `inf`.
        """
        p = check_norm_type(norm_type)
        if param_norms.ndim != 1 or param_norms.numel() != len(self.names):
            raise ValueError(
                f"`param_norms` must be 1-D with one norm per name ({len(self.names)}), got shape "
                f"{tuple(param_norms.shape)}; build a new LayerNormGrouper when the parameters with gradients change."
            )
        norms = param_norms.float()
        index = self._index_on(norms.device)
        empty = torch.zeros(len(self.groups), device=norms.device)
        peak = empty.scatter_reduce(0, index, norms, "amax", include_self=False)
        if math.isinf(p):
            return peak
        # Divide by each group's largest norm first, so that large p neither overflows nor underflows. A group whose
        # largest norm is 0, Inf or NaN is divided by 1 and comes out 0, Inf or NaN.
        scale = torch.where(torch.isfinite(peak) & (peak > 0), peak, torch.ones_like(peak))
        summed = empty.scatter_add(0, index, (norms / scale[index]) ** p)
        return summed ** (1.0 / p) * scale

    def to_logs(self, group_norms: torch.Tensor) -> dict[str, float]:
        """`{"grad_norm/<group>": float}` from `group_norms(...)` (one host sync)."""
        return dict(zip(self.keys, group_norms.tolist(), strict=True))

    def logs(self, param_norms: torch.Tensor, norm_type: float | str = 2.0) -> dict[str, float]:
        """`to_logs(group_norms(param_norms, norm_type))`: the log entries of one step (one host sync)."""
        return self.to_logs(self.group_norms(param_norms, norm_type))


def parameters_without_grad(model: nn.Module) -> list[str]:
    """Names (in `named_parameters()` order) of trainable parameters whose `.grad` is `None`.

    Called after the backward passes of the first optimizer step and before its `zero_grad`, these are the
    parameters no loss reached: a forgotten branch, an unused head, a graph cut by `.detach()`.

    Example:
        >>> import torch
        >>> model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "unused": torch.nn.Linear(2, 1)})
        >>> model["used"](torch.ones(1, 2)).sum().backward()
        >>> parameters_without_grad(model)
        ['unused.weight', 'unused.bias']
    """
    return [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]


def no_grad_warning(names: Sequence[str], limit: int = SHOWN_NAMES) -> str:
    """The one warning line naming the trainable parameters that received no gradient.

    Example:
        >>> no_grad_warning(["unused.weight", "unused.bias"])
        '2 trainable parameters received no gradient at the first optimizer step (an unused branch or head, or a \
graph cut by .detach()?): unused.weight, unused.bias'
    """
    shown = ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
    noun = "parameter" if len(names) == 1 else "parameters"
    return (
        f"{len(names)} trainable {noun} received no gradient at the first optimizer step (an unused branch or head, "
        f"or a graph cut by .detach()?): {shown}"
    )


class LayerNormsLog(TrainerComponent):
    """`log_grad_norms`: each training log gains the last optimizer step's norm of every layer group
    (`grad_norm/embeddings`, `grad_norm/layer.<i>`, `grad_norm/head`), `grad_norm_post_clip` and `clip_coef`
    (one host sync a log)."""

    every_step = True

    def __init__(self, norm_type: float):
        self.norm_type = norm_type
        self._grouper: LayerNormGrouper | None = None
        self._last: ClipStep | None = None

    @classmethod
    def from_args(cls, settings, model) -> LayerNormsLog | None:
        return cls(settings.clip_norm_type) if settings.log_grad_norms else None

    def after_clip(self, trainer, step: ClipStep) -> None:
        self._last = step

    def log_entries(self, trainer) -> dict[str, float]:
        if self._last is None:
            return {}
        step, self._last = self._last, None
        if self._grouper is None or self._grouper.names != step.names:
            self._grouper = LayerNormGrouper(trainer.model, step.names)
        result = step.result
        groups = self._grouper.group_norms(result.param_norms, self.norm_type)
        coef = clip_coefficient(result)
        values = torch.cat([groups, torch.stack([result.total_norm_post_clip, coef]).float()]).tolist()
        logs = dict(zip(self._grouper.keys, values[:-2], strict=True))
        logs["grad_norm_post_clip"], logs["clip_coef"] = values[-2:]
        return logs
