"""GradTrainer with the schedule and noise-scale fields; run under torchrun (2 processes, gloo) or alone.
Saves what it saw.

Usage: python ddp_schedules.py unfreeze OUT_FILE PER_DEVICE_BATCH   (tiny BERT: LLRD + gradual unfreezing)
       python ddp_schedules.py noise OUT_FILE PER_DEVICE_BATCH      (linear regression, learning rate 0)

Each process writes OUT_FILE.<rank>: its final weights, its logs and (noise) the inputs of each of its micro-batches.
"""

from __future__ import annotations

import os
import sys

# The checkout's root: `tests.conftest`, and this checkout's package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_gradtools import GradTrainer, GradTrainingArguments  # noqa: E402
from tests.conftest import classification_data, exit_without_teardown, tiny_classifier  # noqa: E402

DIM = 6


class RecordingRegression(nn.Module):
    """`0.5 * mean squared error` of a linear model; remembers the inputs of every forward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(DIM, 1)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, labels=None):
        self.seen.append((x.detach().clone(), labels.detach().clone()))
        return {"loss": 0.5 * (self.linear(x).squeeze(-1) - labels).square().mean()}


def regression_rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, DIM, generator=g)
    y = x @ torch.linspace(-1, 1, DIM) + 0.5 * torch.randn(n, generator=g)
    return [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]


def main(mode: str, out_file: str, batch: int) -> None:
    common = dict(
        output_dir=os.path.dirname(out_file),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=0,
        logging_steps=1,
        dataloader_num_workers=0,
    )
    if mode == "unfreeze":
        model, data = tiny_classifier(), classification_data(48)
        args = GradTrainingArguments(
            **common,
            max_steps=6,
            learning_rate=1e-2,
            freeze_embeddings=True,
            freeze_first_n_layers=2,
            gradual_unfreeze_steps=2,
            layerwise_lr_decay=0.8,
        )
    else:
        model, data = RecordingRegression(), regression_rows(64)
        args = GradTrainingArguments(
            **common, max_steps=4, learning_rate=0.0, loss_normalization="element", log_grad_noise_scale=True
        )
    trainer = GradTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "logs": trainer.state.log_history,
            "seen": getattr(model, "seen", []),
        },
        f"{out_file}.{rank}",
    )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    exit_without_teardown()
