"""Mean pooling for a sequence-classification head: the classifier reads the token states averaged over the
attention mask instead of the first token's state.

Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to give a mean-pooled representation, so a
head on the mean learns from it (the CoLA recipe uses `--classifier_pooling mean`). The choice is recorded as
`config.classifier_pooling` in the saved config.json; code that loads such a folder applies it again with
`set_classifier_pooling(model)` (put `examples/` on `sys.path`).
"""

from __future__ import annotations

import json
import os

import torch

POOLINGS = ("cls", "mean")


def use_mean_pooling(model) -> None:
    """Make a BERT-style classifier read the mean of the token states over the attention mask, not the first token.

    The pooler's dense layer and activation stay, applied to the mean instead of the first token's state, so the
    weights and their names do not change. `config.classifier_pooling = "mean"` records the choice.

    Raises:
        ValueError: the model has no BERT-style pooler (`pooler.dense` and `pooler.activation`).

    >>> model = AutoModelForSequenceClassification.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    >>> use_mean_pooling(model)  # logits now come from tanh(dense(mean of the unpadded token states))
    """
    base = model.base_model
    pooler = getattr(base, "pooler", None)
    if not isinstance(getattr(pooler, "dense", None), torch.nn.Linear) or not callable(
        getattr(pooler, "activation", None)
    ):
        raise ValueError(
            f"`classifier_pooling` 'mean' needs a BERT-style pooler (`pooler.dense` and `pooler.activation`) in "
            f"{type(model).__name__}; this model has none. Use 'cls'."
        )

    def pool(module, args, kwargs, output):
        hidden = output[0]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = hidden.new_ones(hidden.shape[:2]) if mask is None else mask.to(hidden.dtype)
        mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        pooled = module.pooler.activation(module.pooler.dense(mean))
        if isinstance(output, tuple):
            return (hidden, pooled, *output[2:])
        output.pooler_output = pooled
        return output

    base.register_forward_hook(pool, with_kwargs=True)
    model.config.classifier_pooling = "mean"


def set_classifier_pooling(model, pooling: str | None = None) -> None:
    """Give a loaded classifier the pooling `pooling` ('cls' or 'mean'; None: what its config records, else 'cls').

    A model whose config has its own `classifier_pooling` field (ModernBERT) pools in its own head: the field is
    set. Any other model gets `use_mean_pooling` for 'mean'; for 'cls' a recorded 'mean' is dropped from its config.
    """
    config = model.config
    if hasattr(type(config), "classifier_pooling"):
        if pooling:
            config.classifier_pooling = pooling
    elif (pooling or getattr(config, "classifier_pooling", "cls")) == "mean":
        use_mean_pooling(model)
    elif hasattr(config, "classifier_pooling"):
        del config.classifier_pooling


def pooling_of_checkpoint(checkpoint: str, pooling: str | None) -> str | None:
    """The pooling to resume `checkpoint` with: the one its config.json records, unless `pooling` is given.

    Raises:
        ValueError: `pooling` differs from the checkpoint's; the resumed run would train another head.
    """
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return pooling
    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("classifier_pooling", "cls")
    if pooling is not None and pooling != saved:
        raise ValueError(
            f"`classifier_pooling` {pooling!r}, but checkpoint {checkpoint!r} was trained with {saved!r}; resume "
            f"with --classifier_pooling {saved} (or leave it out)."
        )
    return saved
