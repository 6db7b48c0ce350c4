"""Layer-wise learning-rate decay (LLRD): optimizer parameter groups whose rate falls with depth below the head.

With a layer stack of `N` blocks (found as freezing finds it, `layout.find_layer_stack`) and a base rate `lr`,
block `i` (0 = nearest the input) trains at `lr * decay**(N - 1 - i)`, the input embedding block
(`layout.find_input_embeddings`) at `lr * decay**N`, and everything else (head, pooler, final norms, shared
relative-position embeddings) at `lr`. Each depth is split as the Trainer splits its parameters: weight decay on
the names `Trainer.get_decay_parameter_names(model)` returns, none on the rest (biases, norms).

- Encoder-decoder models (T5, BART): the stack is the encoder's, so the decay runs over the encoder blocks. The
  decoder blocks and the decoder's final norm train at `lr`, like the head: they sit next to the output. What
  `find_input_embeddings` returns trains at `lr * decay**N`, which for BART includes the decoder's position
  embeddings and embedding LayerNorm (T5 and BART share one token embedding between both stacks).
- Shared blocks (ALBERT runs `num_hidden_layers` layers through `num_hidden_groups` blocks): a block trains at
  the rate of the first layer that runs it; with one group that is layer 0, `lr * decay**(N - 1)`. Its label is
  the block's index, `layer.0`. ALBERT's embedding projection (`encoder.embedding_hidden_mapping_in`) is
  outside both and trains at `lr`.
- Tied output heads (GPT-2's LM head is its token embedding) are the embedding tensor: they train at its rate.

Every group carries a readable `"hf_gradtools_group"` key such as `"layer.3/decay"` or `"embeddings/no_decay"`;
torch optimizers keep extra keys and ignore them, and save them in their state dict.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=2, intermediate_size=32, vocab_size=100))
    >>> decay_names = [n for n, _ in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
    >>> groups = layerwise_lr_groups(model, base_lr=1e-3, decay=0.5, weight_decay=0.01,
    ...     decay_parameter_names=decay_names)
    >>> [(g["hf_gradtools_group"], g["lr"]) for g in groups if g["weight_decay"]]
    [('head/decay', 0.001), ('layer.2/decay', 0.001), ('layer.1/decay', 0.0005), ('layer.0/decay', 0.00025), ('embeddings/decay', 0.000125)]
"""  # noqa: E501

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

from torch import nn
from torch.optim import Optimizer

from ..layout import EMBEDDINGS, HEAD, block_label, find_input_embeddings, find_layer_stack
from ..settings import check_layerwise_lr_decay

GROUP_KEY = "hf_gradtools_group"


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)


def _check_non_negative(value: float, field: str) -> float:
    if not _is_number(value) or not 0 <= value < math.inf:
        raise ValueError(f"`{field}` must be a finite number >= 0, got {value!r}.")
    return float(value)


def layerwise_lr_scales(model: nn.Module, decay: float) -> dict[str, tuple[str, float]]:
    """Map every parameter name (as `named_parameters()` gives it, trainable or not) to `(label, lr multiplier)`.

    Labels: `embeddings`, `layer.<block index>`, `head` (the rest; the module docstring has the multipliers). A tensor
    that belongs to the embeddings and to a block (never the case in transformers' models) counts as embeddings.

    Raises:
        LayerStackNotFoundError: the model has no layer stack or no input embeddings.
        ValueError: `decay` is not in (0, 1].
    """
    decay = check_layerwise_lr_decay(decay, "decay")
    stack = find_layer_stack(model)
    depth = stack.num_layers
    label_of: dict[int, tuple[str, float]] = {}
    for _, module in find_input_embeddings(model):
        for param in module.parameters():
            label_of.setdefault(id(param), (EMBEDDINGS, decay**depth))
    shared = stack.shared_parameters()  # T5's relative attention bias: used by every layer, trains at `lr`
    for index, block in enumerate(stack.blocks):
        first_layer = min((layer for layer in range(depth) if stack.block_index(layer) == index), default=index)
        for param in block.parameters():
            if id(param) not in shared:
                label_of.setdefault(id(param), (block_label(index), decay ** (depth - 1 - first_layer)))
    return {name: label_of.get(id(param), (HEAD, 1.0)) for name, param in model.named_parameters()}


def _label_order(label: str) -> tuple[int, int]:
    """From the output down: the rest (base rate) first, then the blocks from the top, the embeddings last."""
    if label == EMBEDDINGS:
        return (2, 0)
    if label.startswith("layer."):
        return (1, -int(label.split(".", 1)[1]))
    return (0, 0)


def param_groups_for(
    model: nn.Module,
    parameter_names: Iterable[str],
    *,
    base_lr: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
    layerwise_lr_decay: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups for the named parameters, with the settings they get had they trained from the start.

    Use it for parameters unfrozen during training (`torch.optim.Optimizer.add_param_group`, see
    `live_groups.add_param_groups`) as well as for the first optimizer. With `layerwise_lr_decay` set, each group
    gets its depth's rate (module docstring); with `None`, every group trains at `base_lr`, split as the Trainer's
    two groups are (weight decay / none), and labelled by where the parameters sit, e.g. `layer.3/no_decay`.

    Args:
        model: the model the names refer to.
        parameter_names: names as `model.named_parameters()` gives them; `requires_grad` is not checked.
        base_lr: the Trainer's `learning_rate`.
        weight_decay: the Trainer's `weight_decay`, applied to the names in `decay_parameter_names`.
        decay_parameter_names: what `Trainer.get_decay_parameter_names(model)` returns.
        layerwise_lr_decay: the decay factor in (0, 1], or `None` for none.

    Returns:
        Groups `{"params", "lr", "weight_decay", "hf_gradtools_group"}` from the output down: the rest first (so
        the first group, whose rate the Trainer logs as `learning_rate`, is at the base rate), then the blocks
        from the top, the embeddings last, each with weight decay first; no empty group; parameters in
        `named_parameters()` order within a group.

    Raises:
        LayerStackNotFoundError: the model's layer stack or input embeddings cannot be found (needed for the labels).
        ValueError: a rate, the decay or a name is invalid; the message names it.
    """
    base_lr = _check_non_negative(base_lr, "base_lr")
    weight_decay = _check_non_negative(weight_decay, "weight_decay")
    wanted = set(parameter_names)
    params = dict(model.named_parameters())
    unknown = sorted(wanted - params.keys())
    if unknown:
        raise ValueError(f"{type(model).__name__} has no parameter named {unknown[0]!r} (from `parameter_names`).")
    scales = layerwise_lr_scales(model, 1.0 if layerwise_lr_decay is None else layerwise_lr_decay)
    decayed = set(decay_parameter_names)
    grouped: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in params.items():
        if name in wanted:
            grouped.setdefault((scales[name][0], name in decayed), []).append(param)
    multiplier = {label: scale for label, scale in scales.values()}
    groups = []
    for label, decays in sorted(grouped, key=lambda key: (_label_order(key[0]), not key[1])):
        groups.append(
            {
                "params": grouped[(label, decays)],
                "lr": base_lr * multiplier[label],
                "weight_decay": weight_decay if decays else 0.0,
                GROUP_KEY: f"{label}/{'decay' if decays else 'no_decay'}",
            }
        )
    return groups


def layerwise_lr_groups(
    model: nn.Module,
    base_lr: float,
    decay: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
) -> list[dict]:
    """LLRD parameter groups for every trainable parameter of `model` (frozen ones are in no group).

    Pass the result to the optimizer class in place of the Trainer's two groups; see `param_groups_for` for the
    group layout and the module docstring for the rates.
    """
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    return param_groups_for(
        model,
        trainable,
        base_lr=base_lr,
        weight_decay=weight_decay,
        decay_parameter_names=decay_parameter_names,
        layerwise_lr_decay=check_layerwise_lr_decay(decay, "decay"),
    )


def layerwise_optimizer(
    model: nn.Module,
    optimizer_cls,
    optimizer_kwargs: dict,
    *,
    base_lr: float,
    decay: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
):
    """Build `optimizer_cls(layerwise_lr_groups(...), **optimizer_kwargs)`: the Trainer's optimizer, with LLRD groups.

    `optimizer_cls` and `optimizer_kwargs` are what `Trainer.get_optimizer_cls_and_kwargs` (or the Trainer's
    `optimizer_cls_and_kwargs`) gives; every group sets its own `lr` and `weight_decay`, so those two kwargs are only
    defaults. Optimizers that choose their own parameters (factories such as Muon, GaLore's `params`, LOMO's
    `model`, layer-wise `optimizer_dict`) cannot take these groups and are refused.

    Raises:
        ValueError: the optimizer builds its own parameter groups.
    """
    own = [key for key in ("params", "model", "optimizer_dict") if key in optimizer_kwargs]
    if own or not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, Optimizer):
        what = f"its `{own[0]}` argument" if own else f"{getattr(optimizer_cls, '__name__', optimizer_cls)!r}"
        raise ValueError(
            f"`layerwise_lr_decay` needs an optimizer that takes parameter groups, but {what} builds its own. Use "
            "a torch optimizer (e.g. optim='adamw_torch'), or leave `layerwise_lr_decay` unset."
        )
    groups = layerwise_lr_groups(model, base_lr, decay, weight_decay, decay_parameter_names)
    return optimizer_cls(groups, **optimizer_kwargs)


def refuse_supplied_optimizer(settings, host_init, model, args, pargs, kwargs) -> None:
    """LLRD builds the optimizer's groups itself: an optimizer instance passed to the trainer (`host_init`'s
    `optimizers`) cannot get them."""
    if settings.layerwise_lr_decay is None:
        return
    try:
        optimizers = inspect.signature(host_init).bind_partial(model, args, *pargs, **kwargs).arguments
    except TypeError:
        return  # the host's own error follows
    optimizer = (optimizers.get("optimizers") or (None, None))[0]
    if optimizer is not None:
        raise ValueError(
            f"`layerwise_lr_decay`={settings.layerwise_lr_decay} needs to build the optimizer's "
            f"parameter groups, but an optimizer instance ({type(optimizer).__name__}) was passed in "
            "`optimizers`. Pass its class and kwargs as `optimizer_cls_and_kwargs` instead (honoured, with the "
            "LLRD groups), or leave `layerwise_lr_decay` unset."
        )
