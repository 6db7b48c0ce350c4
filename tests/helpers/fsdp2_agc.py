"""AGC on FSDP2-sharded gradients (`fully_shard`, under torchrun) against AGC on the same gradients unsharded.

Each process builds the same partly frozen tiny BERT, shards it per layer and at the root, runs one backward, then
clips a copy of the full (gathered) gradients with AGC in plain tensors, and the sharded gradients in place; the
gathered result must equal the plain one. Writes the largest relative difference and the number of clipped units
to OUT_FILE from the first process.

Usage: torchrun --standalone --nproc_per_node 2 fsdp2_agc.py OUT_FILE
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers as T  # noqa: E402

from hf_gradtools import freeze_embeddings, freeze_first_n_layers  # noqa: E402
from hf_gradtools.clipping.agc import agc_clip_, default_agc_exclude  # noqa: E402
from hf_gradtools.snapshots.tensors import GradTensorSaver  # noqa: E402
from tests.conftest import exit_without_teardown, tiny_config, token_rows  # noqa: E402


def main(out_file: str) -> None:
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    model = T.AutoModelForSequenceClassification.from_config(config)
    freeze_embeddings(model)
    freeze_first_n_layers(model, 1)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    ids = torch.tensor(token_rows(4, seed=3))
    model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    plain = []
    for name, param in named:
        copy = torch.nn.Parameter(param.detach().full_tensor().clone())
        copy.grad = param.grad.full_tensor().clone()
        plain.append((name, copy))
    # Gradient tensors of sharded parameters, gathered whole on every process (before clipping changes them).
    saved = GradTensorSaver(model.named_parameters(), [r"layer\.1\.output\.dense"]).copy(1).tensors
    tensors_equal = (
        all(torch.equal(saved[name], param.grad.full_tensor()) for name, param in named if name in saved)
        and len(saved) == 2
    )
    exclude = default_agc_exclude(model)
    # A small factor so that most units clip: the comparison then covers the clipped path.
    agc_clip_(plain, clip_factor=1e-3, eps=1e-3, exclude=exclude)
    result = agc_clip_(named, clip_factor=1e-3, eps=1e-3, exclude=exclude)
    # The relative error of each tensor (gradients at initialisation are tiny), the largest over the tensors.
    worst = max(
        float((p.grad.full_tensor() - q.grad).norm() / q.grad.norm().clamp_min(1e-30))
        for (_, p), (_, q) in zip(named, plain, strict=True)
    )
    clipped = int(result.num_clipped)
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            f.write(f"{worst} {clipped} {int(tensors_equal)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
