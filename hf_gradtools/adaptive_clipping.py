"""Adaptive gradient clipping: AGC (unit-wise, relative to the weights) and AutoClip (a percentile of past norms).

**AGC**, Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization"
(ICML 2021). Every unit's gradient `G_u` is rescaled, where needed, so that
`||G_u|| <= clip_factor * max(||W_u||, eps)`, all norms L2. A unit is one output row: index `i` along dim 0 of a
parameter with two or more dims (a `Linear`'s output feature; a conv's output channel, its norm over all other
dims), and the whole tensor for biases and other parameters of one dim or none. Weights stored input-first, like
transformers' `Conv1D` in GPT-2, have their output units along the last dim: list them in `transposed`
(`transposed_weights(model)` finds them). The paper leaves the final classifier layer unclipped;
`default_agc_exclude(model)` gives patterns for the task head.

**AutoClip**, Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
Separation Networks" (MLSP 2020). At each step the total gradient norm is appended to the history of all norms
seen so far, then the gradient is clipped to the `percentile`-th percentile of that history.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    ...     _ = layer.bias.copy_(torch.tensor([1.0, 0.0]))
    >>> layer.weight.grad = torch.tensor([[0.3, 0.4], [0.0, 0.1]])
    >>> layer.bias.grad = torch.tensor([0.001, 0.0])
    >>> result = agc_clip_(layer.named_parameters(), clip_factor=0.01, eps=1e-3)
    >>> layer.weight.grad  # row 0 to norm 0.01 * 5; row 1 to 0.01 * eps (its weights are 0)
    tensor([[3.0000e-02, 4.0000e-02],
            [0.0000e+00, 1.0000e-05]])
    >>> result.num_units, int(result.num_clipped)  # the bias (norm 0.001 <= 0.01 * 1) is left alone
    (3, 2)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .clipping import Partial, Shard, _is_sharded, _local, _scale_, grad_norms, total_norm
from .layout import model_layout
from .patterns import compile_patterns
from .state_fields import FLOAT32_MAX, FieldReader

# Floor of a unit's gradient norm before dividing by it (a zero gradient needs no clipping).
_GRAD_NORM_FLOOR = 1e-6
# `torch.nn.utils.clip_grad_norm_` adds this to the total norm before dividing; AutoClip uses the same formula.
_EPS = 1e-6
# Module names that hold a task head, for models that are not a transformers task model.
HEAD_MODULE_NAMES = (
    "classifier",
    "classification_head",
    "pre_classifier",
    "score",
    "qa_outputs",
    "lm_head",
    "cls",
    "head",
    "fc",
)


def _check_positive(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{field}` must be a positive finite number, got {value!r}.")
    return float(value)


def check_agc_settings(
    clip_factor: float, eps: float, exclude: Iterable[str] | None = None
) -> tuple[float, float, list[re.Pattern]]:
    """Validate AGC's settings as `agc_clip_` does (for an arguments class's `__post_init__`).

    Returns `(clip_factor, eps, compiled exclude patterns)`; raises a `ValueError` naming `agc_clip_factor`,
    `agc_eps` or `agc_exclude`.
    """
    return (
        _check_positive(clip_factor, "agc_clip_factor"),
        _check_positive(eps, "agc_eps"),
        compile_patterns(exclude or (), "agc_exclude"),
    )


@dataclass
class AgcResult:
    """What `agc_clip_` did. Tensors stay on the device: reading them is the caller's host sync.

    Attributes:
        num_units: how many units (rows, or whole 1-D tensors) were checked; excluded parameters not counted.
        num_clipped: 0-d integer tensor, how many of them were rescaled.
        total_norm_post_clip: the `norm_type` norm of all gradients after clipping (excluded ones included), or
            `None` when `agc_clip_` was given no `norm_type`.
    """

    num_units: int
    num_clipped: torch.Tensor
    total_norm_post_clip: torch.Tensor | None


def _unit_norms(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """L2 norm of each unit, shaped to broadcast against `tensor` (its local shard, for a DTensor), in float32.

    An FSDP2 shard (DTensor) holds whole units when it is split along the unit dimension (rows, by default): its
    norms are local. A unit split across processes (a 1-D tensor, or a transposed weight) sums its squares over the
    processes that hold it, with one all-reduce per sharded mesh dimension.
    """
    unit_dim = None if tensor.ndim <= 1 else (tensor.ndim - 1 if transposed else 0)
    local = _local([tensor])[0]
    if unit_dim is None:
        dims, keepdim = tuple(range(local.ndim)), False
    else:
        dims, keepdim = tuple(d for d in range(local.ndim) if d != unit_dim), True
    if local is tensor:
        return torch.linalg.vector_norm(tensor, dim=dims or None, keepdim=keepdim, dtype=torch.float32)
    squares = local.float().pow(2).sum(dim=dims, keepdim=keepdim) if dims else local.float().pow(2)
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Partial):
            raise ValueError(f"AGC cannot clip a tensor with a pending reduction (placements {tensor.placements}).")
        if isinstance(placement, Shard) and placement.dim != unit_dim:
            torch.distributed.all_reduce(squares, group=tensor.device_mesh.get_group(mesh_dim))
    return squares.sqrt()


def agc_clip_(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    exclude: Iterable[str] = (),
    norm_type: float | None = None,
    transposed: Iterable[str] = (),
) -> AgcResult:
    """Clip the `.grad` of `named_parameters` unit-wise in place, relative to each unit's weight norm (AGC).

    Per unit: `max_norm = clip_factor * max(||W_u||, eps)`; where `||G_u|| > max_norm`,
    `G_u *= max_norm / ||G_u||`. No host sync: every decision is a multiply by a device-side factor (1 where the
    unit is within bounds, which leaves it bit for bit as it was).

    Args:
        named_parameters: `(name, parameter)` pairs, e.g. `model.named_parameters()`; those without `.grad` are
            skipped.
        clip_factor: `lambda` of the paper, positive (`agc_clip_factor`).
        eps: floor of the weight norm, positive (`agc_eps`), so that zero-initialised weights can still move.
        exclude: regex name patterns (`re.search`) of parameters left unclipped, e.g. `default_agc_exclude(model)`.
        norm_type: if given, also return the total norm after clipping in this norm (one fused norm pass).
        transposed: names of weights stored input-first (output units along the last dim).

    Returns:
        `AgcResult`.
    """
    clip_factor, eps, regexes = check_agc_settings(clip_factor, eps, exclude)
    transposed = set(transposed)
    grads, clipped, num_units, device = [], [], 0, None
    for name, param in named_parameters:
        grad = param.grad
        if grad is None:
            continue
        grads.append(grad)
        local = _local([grad])[0]  # FSDP2 (DTensor): this process's shard, sharing the gradient's storage
        device = device or local.device
        if any(regex.search(name) for regex in regexes):
            continue
        is_transposed = name in transposed
        max_norm = _unit_norms(param.detach(), is_transposed).clamp_min(eps) * clip_factor
        norm = _unit_norms(grad, is_transposed)
        local.mul_((max_norm / norm.clamp_min(_GRAD_NORM_FLOOR)).clamp(max=1.0).to(local.dtype))
        clipped.append((norm > max_norm).sum().to(device))
        num_units += norm.numel()
    device = device or torch.device("cpu")
    num_clipped = torch.stack(clipped).sum() if clipped else torch.zeros((), dtype=torch.long, device=device)
    post = total_norm(grad_norms(grads, norm_type), norm_type) if norm_type is not None else None
    return AgcResult(num_units=num_units, num_clipped=num_clipped, total_norm_post_clip=post)


def transposed_weights(model: nn.Module) -> list[str]:
    """Names of the weights that transformers' `Conv1D` (GPT-2 and kin) stores as `(in, out)`.

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=10, n_positions=8))
        >>> transposed_weights(model)[:2]
        ['h.0.attn.c_attn.weight', 'h.0.attn.c_proj.weight']
    """
    names = []
    for module_name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or `model` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else None
    return inner if isinstance(inner, nn.Module) and inner is not model else model


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names (in `named_parameters()` order) of the parameters of the model's task head.

    Found from the structure: for a transformers task model (also inside PEFT), every parameter outside its base
    model (`model.base_model`: BERT's `classifier`, RoBERTa's whole `classifier` head, DistilBERT's
    `pre_classifier` and `classifier`, GPT-2's and Llama's `score`, BERT's `cls` MLM head), plus the output
    embeddings (`get_output_embeddings()`) unless they are tied to the input embeddings (a tied weight is the
    input embedding and is clipped as one). For other models: modules named like a head (`HEAD_MODULE_NAMES`)
    outside the layer stack and the embeddings (found by `hf_gradtools.layout`). A bare base model has no head.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=8, vocab_size=10))
        >>> head_parameter_names(model)
        ['classifier.weight', 'classifier.bias']
    """
    inner = _unwrap(model)
    base = getattr(inner, "base_model", None)
    if isinstance(base, nn.Module) and base is not inner:
        in_base = {id(p) for p in base.parameters()}
        head = {id(p) for p in inner.parameters() if id(p) not in in_base}
    else:
        stack, embeddings = model_layout(inner)
        skip = ([stack] if stack else []) + embeddings
        head = set()
        for module_name, module in inner.named_modules():
            if module_name.rpartition(".")[2] in HEAD_MODULE_NAMES and not _inside(module_name, skip):
                head |= {id(p) for p in module.parameters()}
    get_output = getattr(inner, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        get_input = getattr(inner, "get_input_embeddings", None)
        inputs = get_input() if callable(get_input) else None
        tied = {id(p) for p in inputs.parameters()} if isinstance(inputs, nn.Module) else set()
        head |= {id(p) for p in output.parameters() if id(p) not in tied}
    return [name for name, param in model.named_parameters() if id(param) in head]


def default_agc_exclude(model: nn.Module) -> list[str]:
    """Anchored regex patterns (`^name$`) of `head_parameter_names(model)`: AGC's default exclusion."""
    return [f"^{re.escape(name)}$" for name in head_parameter_names(model)]


@dataclass
class AutoClipResult:
    """What `AutoClip.clip_` did; 0-d tensors on the device.

    Attributes:
        threshold: the percentile of the history, the norm the gradient was clipped to.
        clip_coef: the factor the gradients were multiplied by (`min(1, threshold / (total_norm + 1e-6))`).
        total_norm_post_clip: `total_norm * clip_coef`.
    """

    threshold: torch.Tensor
    clip_coef: torch.Tensor
    total_norm_post_clip: torch.Tensor


class AutoClip:
    """AutoClip: clip the total gradient norm to a percentile of every norm seen so far, this step's included.

    The history lives on the device of the norms (no host sync per step); the percentile is
    `torch.nanquantile(history, percentile / 100, interpolation="linear")`, the same as `numpy.percentile`'s
    default method ("linear"). A non-finite norm is stored as NaN and left out of the percentile. The history
    travels with `state_dict()` / `load_state_dict()` as a plain list of floats, so a resumed run continues it
    exactly.

    Args:
        percentile: in (0, 100]; the paper's recommended range is 5 to 25 (`autoclip_percentile`).

    Example:
        >>> clipper = AutoClip(percentile=50)
        >>> [round(clipper.threshold(torch.tensor(n)).item(), 3) for n in [4.0, 1.0, 2.0, 10.0]]
        [4.0, 2.5, 2.0, 3.0]
        >>> clipper.state_dict()
        {'history': [4.0, 1.0, 2.0, 10.0]}
    """

    def __init__(self, percentile: float = 10.0):
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not 0 < percentile <= 100  # also rejects NaN
        ):
            raise ValueError(f"`autoclip_percentile` must be a number in (0, 100], got {percentile!r}.")
        self.percentile = float(percentile)
        self._buffer = torch.zeros(0)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def history(self) -> list[float]:
        """Every norm recorded, oldest first (a host sync)."""
        return self._buffer[: self._count].tolist()

    def _append(self, norm: torch.Tensor) -> None:
        if self._buffer.device != norm.device:
            self._buffer = self._buffer.to(norm.device)
        if self._count == self._buffer.numel():
            grown = torch.empty(max(64, 2 * self._count), dtype=torch.float32, device=norm.device)
            grown[: self._count] = self._buffer[: self._count]
            self._buffer = grown
        self._buffer[self._count] = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.nan))
        self._count += 1

    def threshold(self, total_norm: torch.Tensor | float) -> torch.Tensor:
        """Append `total_norm` to the history and return the history's percentile (0-d float32, on its device)."""
        norm = torch.as_tensor(total_norm).detach().reshape(()).float()
        self._append(norm)
        return torch.nanquantile(self._buffer[: self._count], self.percentile / 100.0, interpolation="linear")

    def clip_(self, parameters: Iterable[torch.Tensor], total_norm: torch.Tensor | float) -> AutoClipResult:
        """Record `total_norm` and rescale the `.grad` of `parameters` to at most the percentile, in place.

        Args:
            parameters: the tensors whose gradients `total_norm` measured; those without `.grad` are skipped.
            total_norm: the norm of those gradients before this clipping, in any norm type (e.g. from
                `clip_gradients(...).total_norm`, or its `total_norm_post_clip` after value clipping).
        """
        norm = torch.as_tensor(total_norm).detach().reshape(()).float()
        threshold = self.threshold(norm)
        coef = torch.clamp(threshold / (norm + _EPS), max=1.0)
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            # FSDP2 (DTensor) gradients: `total_norm` is already global; each process scales its own shards.
            _scale_(_local(grads) if _is_sharded(grads) else grads, coef)
        return AutoClipResult(threshold=threshold, clip_coef=coef, total_norm_post_clip=norm * coef)

    def state_dict(self) -> dict:
        """`{"history": [float, ...]}`, oldest first."""
        return {"history": self.history}

    @staticmethod
    def check_state(state) -> dict:
        """`state` as `state_dict()` writes it, or `StateFieldError` naming the field: each norm of the history is
        a non-negative float32 number, or NaN (a step whose norm was not finite)."""
        fields = FieldReader(state, "AutoClip state must be {'history': [float, ...]}")
        history = fields.numbers("history", low=0.0, high=FLOAT32_MAX, nan=True)
        fields.done()
        return {"history": history}

    def load_state_dict(self, state: dict) -> None:
        """Restore the history saved by `state_dict()` (checked by `check_state`); the next norm is appended."""
        history = self.check_state(state)["history"]
        self._buffer = torch.tensor(history, dtype=torch.float32)
        self._count = len(history)
