"""Keep frozen modules in eval mode while the rest trains: no dropout in them, BatchNorm statistics fixed.

A module counts as frozen when it holds at least one parameter and every parameter it holds (at any depth) has
`requires_grad=False`; parameterless modules inside it (Dropout, a BatchNorm without affine parameters) go with
it. The Trainer calls `model.train()` before every training step, which turns every module back to train mode,
so call `set_frozen_eval_mode(model)` after each `model.train()`; modules unfrozen in between simply stay in
train mode. Parameterless modules outside a frozen module (e.g. GPT-2's dropout after its embeddings) are left
alone.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 1))
    >>> frozen = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5))
    >>> model.insert(0, frozen)  # doctest: +ELLIPSIS
    Sequential(...)
    >>> frozen.requires_grad_(False)  # doctest: +ELLIPSIS
    Sequential(...)
    >>> set_frozen_eval_mode(model.train())
    ['0']
    >>> frozen[1].training, frozen[2].training, model[2].training
    (False, False, True)
"""

from __future__ import annotations

import weakref

from torch import nn


def _frozen_status(module: nn.Module, memo: dict[int, tuple[bool, bool]]) -> tuple[bool, bool]:
    """`(has a parameter, has a trainable parameter)` of `module` and everything under it."""
    key = id(module)
    if key not in memo:
        memo[key] = (False, False)  # a module that contains itself (never in practice) counts as empty
        has = trainable = False
        for param in module.parameters(recurse=False):
            has = True
            trainable = trainable or param.requires_grad
        for child in module.children():
            child_has, child_trainable = _frozen_status(child, memo)
            has, trainable = has or child_has, trainable or child_trainable
        memo[key] = (has, trainable)
    return memo[key]


def find_frozen_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost frozen modules of `model` as `(name, module)`, in module order (`""` if all is frozen)."""
    memo: dict[int, tuple[bool, bool]] = {}
    _frozen_status(model, memo)
    found: list[tuple[str, nn.Module]] = []
    covered: set[str] = set()
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if name and parent in covered:
            covered.add(name)
            continue
        has, trainable = memo[id(module)]
        if has and not trainable:
            found.append((name, module))
            covered.add(name)
    return found


# model -> (its parameters' requires_grad flags, its frozen modules): found again only when a flag changes.
_found: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[bool, ...], list[tuple[str, nn.Module]]]]
_found = weakref.WeakKeyDictionary()


def set_frozen_eval_mode(model: nn.Module) -> list[str]:
    """Put the outermost frozen modules of `model` (and so all under them) in eval mode; return their names.

    Cheap enough for every micro-batch: the frozen modules are searched again only when some parameter's
    `requires_grad` has changed since the last call on this model. An embedding that NEFTune adds noise to
    (`neftune_noise_alpha`, frozen embeddings under LoRA, say) stays in train mode while `model` trains: its noise
    acts only there, and an `nn.Embedding` does nothing else differently in train mode.
    """
    flags = tuple(param.requires_grad for param in model.parameters())
    cached = _found.get(model)
    if cached is None or cached[0] != flags:
        cached = (flags, find_frozen_modules(model))
        _found[model] = cached
    for _, module in cached[1]:
        module.eval()
        for sub in module.modules():  # NEFTune's noise on frozen embeddings acts in train mode only: it stays on
            if getattr(sub, "neftune_noise_alpha", None) and model.training:
                sub.train()
    return [name for name, _ in cached[1]]
