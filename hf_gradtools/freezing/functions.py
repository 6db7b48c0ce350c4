"""Freeze and unfreeze parameters of any transformer model, without a Trainer.

Every function that changes `requires_grad` returns the names of the parameters it changed, in
`named_parameters()` order, so calling it twice returns `[]` the second time.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
    ...     intermediate_size=32, vocab_size=100))
    >>> len(freeze_embeddings(model)), len(freeze_first_n_layers(model, 2))
    (5, 32)
    >>> get_frozen_parameters(model)[0]
    'embeddings.word_embeddings.weight'
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

from torch import nn

from ..errors import NoTrainableParametersError, shown_setting
from ..layout import find_input_embeddings, find_layer_stack
from ..settings import GradSettings

ModuleOrModules = nn.Module | nn.Parameter | Iterable[nn.Module | nn.Parameter]

logger = logging.getLogger(__name__)


def _as_module(module_or_modules: ModuleOrModules) -> nn.Module:
    if isinstance(module_or_modules, nn.Module):
        return module_or_modules
    if isinstance(module_or_modules, nn.Parameter):
        holder = nn.Module()
        holder.register_parameter("weight", module_or_modules)
        return holder
    if isinstance(module_or_modules, (str, bytes)) or not isinstance(module_or_modules, Iterable):
        raise TypeError(
            f"freeze/unfreeze take a module, a parameter, or an iterable of them, got {module_or_modules!r} "
            f"({type(module_or_modules).__name__}); to freeze a module by its name, pass `model.get_submodule(name)`."
        )
    items = list(module_or_modules)
    holder = nn.ModuleList()
    for item in items:
        holder.append(_as_module(item))
    return holder


def _set_requires_grad(module: nn.Module, flag: bool, root: nn.Module | None = None) -> list[str]:
    """Set `requires_grad=flag` on every parameter of `module`; return the changed names (qualified in `root`)."""
    changed = {id(p) for p in module.parameters() if p.requires_grad != flag}
    for param in module.parameters():
        param.requires_grad_(flag)
    return [name for name, p in (root or module).named_parameters() if id(p) in changed]


def freeze(module_or_modules: ModuleOrModules) -> list[str]:
    """Set `requires_grad=False` on every parameter of a module, a parameter, or an iterable of them.

    Returns the names of the parameters it froze, relative to the module (for an iterable, prefixed with
    the item's index, as an `nn.ModuleList` names them).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        ...     intermediate_size=32, vocab_size=100))
        >>> freeze(model.encoder.layer[:2])  # doctest: +ELLIPSIS
        ['0.attention.self.query.weight', ...]
    """
    return _set_requires_grad(_as_module(module_or_modules), False)


def unfreeze(module_or_modules: ModuleOrModules) -> list[str]:
    """Set `requires_grad=True` on every parameter; the inverse of `freeze`, with the same return value."""
    return _set_requires_grad(_as_module(module_or_modules), True)


def get_frozen_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters of `module` with `requires_grad=False`, in `named_parameters()` order."""
    return [name for name, param in module.named_parameters() if not param.requires_grad]


def get_trainable_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters of `module` with `requires_grad=True`, in `named_parameters()` order."""
    return [name for name, param in module.named_parameters() if param.requires_grad]


def tied_heads(model: nn.Module, frozen: list[str]) -> list[str]:
    """Names of non-embedding modules' parameters that are the same tensors as `frozen` ones (tied output heads)."""
    wanted = {id(p) for n, p in model.named_parameters() if n in set(frozen)}
    modules = dict(model.named_modules())
    heads = []
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = modules.get(name.rpartition(".")[0])
        if id(param) in wanted and name not in set(frozen) and not isinstance(owner, nn.Embedding):
            heads.append(name)
    return heads


def freeze_embeddings(model: nn.Module) -> list[str]:
    """Freeze the model's input embedding block (see `layout.find_input_embeddings`); return the names frozen.

    With tied input and output embeddings (GPT-2, T5, Llama-family models with `tie_word_embeddings=True`) the
    output head's weight is the same tensor, so it is frozen too: a warning names it, and `frozen_parameters.json`
    lists it under `frozen_tied`.
    """
    modules = [module for _, module in find_input_embeddings(model)]
    frozen = _set_requires_grad(nn.ModuleList(modules), False, root=model)
    tied = tied_heads(model, frozen)
    if tied:
        warnings.warn(
            f"Freezing the input embeddings of {type(model).__name__} also freezes {', '.join(tied)}: tied to them, "
            "it is the same tensor. Untie the weights (`tie_word_embeddings=False`) to keep the output head "
            "trainable.",
            stacklevel=2,
        )
    return frozen


def freeze_first_n_layers(model: nn.Module, n: int) -> list[str]:
    """Freeze the first `n` blocks of the model's main layer stack; return the names frozen.

    A layer is one block of the stack: for ConvNeXt, Swin or ResNet a stage of several blocks (an INFO line of
    the `hf_gradtools.freezing` logger says what a layer is for the model in hand).
    Encoder-decoder models (T5, BART): the first `n` encoder blocks; the decoder stays trainable.
    ALBERT: its layers share `num_hidden_groups` blocks (one by default), so freezing any layer freezes the
    shared block and with it every layer that runs it; a warning says so.
    T5: the relative attention bias lives in block 0 but every layer of the stack uses it, so it stays trainable,
    as DeBERTa's shared relative embeddings (outside the blocks) do.

    Raises:
        ValueError: `n` is negative or larger than the number of layers (the message gives that number).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`freeze_first_n_layers` must be a non-negative integer, got {shown_setting(n)}.")
    if n == 0:
        return []
    stack = find_layer_stack(model)
    if n > stack.num_layers:
        raise ValueError(
            f"`freeze_first_n_layers`={n} but {type(model).__name__} has only {stack.num_layers} layers "
            f"(in `{stack.name}`). Allowed: 0 to {stack.num_layers}."
        )
    indices = stack.blocks_of_first(n)
    if stack.shares_blocks:
        runs = sum(1 for layer in range(stack.num_layers) if stack.block_index(layer) in indices)
        warnings.warn(
            f"{type(model).__name__} shares {len(stack.blocks)} block(s) across its {stack.num_layers} layers: "
            f"freezing the first {n} layer(s) freezes block(s) {indices} of `{stack.name}`, which {runs} "
            "layer(s) run, so all of them stop training.",
            stacklevel=2,
        )
    shared = stack.shared_parameters()
    blocks = nn.ModuleList(stack.blocks[i] for i in indices)
    changed = {id(p) for p in blocks.parameters() if p.requires_grad and id(p) not in shared}
    if changed:  # said once, when the blocks are frozen (not again by a trainer given the frozen model)
        logger.info(
            "hf_gradtools: a layer of %s is %s; freeze_first_n_layers=%d freezes `%s` block(s) %s.",
            type(model).__name__, stack.layer_meaning(), n, stack.name, indices,
        )  # fmt: skip
    for param in blocks.parameters():
        if id(param) in changed:
            param.requires_grad_(False)
    return [name for name, p in model.named_parameters() if id(p) in changed]


# ---- freezing from the settings (`freeze_embeddings`, `freeze_first_n_layers`) ----


def apply_freezing(model: nn.Module, args) -> list[str]:
    """Freeze what `args` (any `TrainingArguments`, or its `GradSettings`) asks for; return the names frozen.

    All or nothing: on an error (too many layers, no layer stack, nothing left to train) every `requires_grad`
    flag is restored before the error propagates.
    """
    settings = GradSettings.of(args)
    embeddings, layers = settings.freeze_embeddings, settings.freeze_first_n_layers
    if not embeddings and not layers:
        return []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        frozen = freeze_embeddings(model) if embeddings else []
        frozen += freeze_first_n_layers(model, layers)
        if not any(p.requires_grad for p in model.parameters()):
            raise NoTrainableParametersError(
                f"No trainable parameter is left in {type(model).__name__} after freezing (`freeze_embeddings`="
                f"{embeddings}, `freeze_first_n_layers`={layers}). Freeze fewer layers, or unfreeze a head."
            )
    except Exception:
        restore_requires_grad(flags)
        raise
    return frozen


def check_something_to_train(model: nn.Module | None, optimizer=None) -> None:
    """Refuse to train a model none of whose parameters requires a gradient (frozen by hand, or a PEFT model loaded
    for inference): its first backward would fail with torch's "element 0 of tensors does not require grad". An
    optimizer passed in that holds a tensor requiring a gradient (trained beside the model) lets it pass.

    Raises:
        NoTrainableParametersError: naming the model's class (and the class inside a PEFT wrapper).
    """
    if model is None or any(p.requires_grad for p in model.parameters()):
        return
    if optimizer is not None and any(p.requires_grad for group in optimizer.param_groups for p in group["params"]):
        return
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    name = type(model).__name__ + (f" (around {type(base).__name__})" if base is not model else "")
    count = sum(1 for _ in model.parameters())
    raise NoTrainableParametersError(
        f"No trainable parameter in {name}: all {count} of its parameter tensors have `requires_grad=False` (frozen "
        "by hand, or a PEFT model loaded for inference), so training would fail at the first backward. Unfreeze what "
        "should train (`hf_gradtools.unfreeze`, or `PeftModel.from_pretrained(..., is_trainable=True)`), or pass "
        "in `optimizers` an optimizer holding the tensors to train."
    )


def frozen_by_settings(model: nn.Module, args) -> list[str]:
    """Names of the frozen parameters that `freeze_embeddings` / `freeze_first_n_layers` cover, whoever froze them
    (this trainer, or its caller before building it)."""
    settings = GradSettings.of(args)
    modules = []
    if settings.freeze_embeddings:
        modules += [module for _, module in find_input_embeddings(model)]
    layers = settings.freeze_first_n_layers
    if layers:
        stack = find_layer_stack(model)
        modules += [stack.blocks[i] for i in stack.blocks_of_first(layers)]
    covered = {id(p) for module in modules for p in module.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in covered and not p.requires_grad]


def restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for param, flag in flags:
        param.requires_grad_(flag)


def has_frozen_parameters(model: nn.Module | None) -> bool:
    return model is not None and any(not p.requires_grad for p in model.parameters())
