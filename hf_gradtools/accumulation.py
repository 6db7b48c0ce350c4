"""Loss weights that make gradient accumulation equal one large batch.

Every Hugging Face head returns, when it is not given `num_items_in_batch`, the mean of its loss over the
*items* of the micro-batch: label tokens that are not -100 for integer labels (after the one-token shift of
causal LM losses), every element for float labels (regression, multi-label), rows when there are no `labels`
(e.g. question answering). Weighting each micro-batch mean by `items_in_micro_batch / items_in_window`
turns the sum of the micro-batch losses into the mean over the whole window, whatever the micro-batch sizes,
and so the accumulated gradient into the gradient of that mean. Under data parallelism the window spans all
processes and the weight is multiplied by the world size, because DDP averages the gradients of the processes.

Example:
    >>> import torch
    >>> batches = [{"labels": torch.tensor([0, 1, 1])}, {"labels": torch.tensor([1])}]
    >>> micro_batch_loss_weights(batches).tolist()
    [0.75, 0.25]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch

IGNORE_INDEX = -100


@functools.cache
def _causal_lm_class_names() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def loss_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether the model's loss predicts token i+1 from token i (a decoder-only causal LM, PEFT-wrapped or not).

    Decided from the model class as well as its `loss_type`: GPT-2's `GPT2LMHeadModel` has no `loss_type`, yet
    shifts its labels.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    if type(base).__name__ in _causal_lm_class_names():
        return True
    return LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss


def _rows(batch: Mapping) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("Cannot count the rows of a batch that holds no tensor.")


def count_loss_items(batch: Mapping, shifts_labels: bool = False) -> torch.Tensor | int:
    """How many items the model's mean loss over `batch` averages over (see the module docstring)."""
    if isinstance(batch.get("shift_labels"), torch.Tensor):
        labels = batch["shift_labels"]
    elif isinstance(batch.get("labels"), torch.Tensor):
        labels = batch["labels"][..., 1:] if shifts_labels else batch["labels"]
    else:
        return _rows(batch)
    if labels.is_floating_point():
        return labels.numel()
    return labels.ne(IGNORE_INDEX).sum()


def micro_batch_loss_weights(
    batches: Sequence[Mapping],
    shifts_labels: bool = False,
    world_size: int = 1,
    gather_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The weight of each micro-batch's mean loss so that their sum is the mean over all items of the window.

    Args:
        batches: the micro-batches of one optimizer step on this process.
        shifts_labels: the loss predicts token i+1 from token i (causal LM), so position 0 is never a target.
        world_size: number of data-parallel processes whose gradients are averaged.
        gather_sum: sums a 0-d tensor over the processes; required when `world_size > 1`.

    Returns:
        A float32 tensor of one weight per micro-batch, on the batches' device. Nothing is read back to the host,
        so a GPU never waits for it. A window without any item gets weights 0.
    """
    if not batches:
        return torch.zeros(0)
    device = next((v.device for v in batches[0].values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    counts = [count_loss_items(b, shifts_labels) for b in batches]
    # Python counts become device scalars through a fill kernel rather than a blocking host-to-device copy.
    counts_t = torch.stack(
        [
            c.to(device=device, dtype=torch.float64)
            if isinstance(c, torch.Tensor)
            else torch.full((), c, device=device, dtype=torch.float64)
            for c in counts
        ]
    )
    window = counts_t.sum()
    if world_size > 1:
        if gather_sum is None:
            raise ValueError("`gather_sum` is required when `world_size` > 1.")
        window = gather_sum(window)
    return (counts_t * world_size / window.clamp_min(1)).float()
