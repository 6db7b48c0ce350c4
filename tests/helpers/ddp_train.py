"""Train a tiny causal LM with GradTrainer; run under torchrun (2 processes, gloo) or alone. Saves the weights.

Usage: python ddp_train.py OUT_FILE PER_DEVICE_BATCH ACCUMULATION
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import transformers as T  # noqa: E402
from datasets import Dataset  # noqa: E402

from hf_gradtools import GradTrainer, GradTrainingArguments  # noqa: E402
from tests.conftest import exit_without_teardown, tiny_config  # noqa: E402


def lm_rows(n: int = 16) -> Dataset:
    """Rows whose label-token counts differ, so that each process holds a different share of the window.

    Plain SGD without clipping, so that any error in the scale of the gradient shows in the weights.
    """
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 64, (n, 10), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, : (i * 3) % 10] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def main(out_file: str, batch: int, accumulation: int) -> None:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    args = GradTrainingArguments(
        output_dir=os.path.dirname(out_file),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,
        clip_norm_type=float("inf"),
        freeze_first_n_layers=1,
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
    trainer = GradTrainer(model=model, args=args, train_dataset=lm_rows())
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        torch.save({"state": model.state_dict(), "losses": losses}, out_file)
    if torch.distributed.is_initialized():
        # Tear the gloo group down on every rank before exit; left to interpreter shutdown, a rank that ends
        # first can abort in C++ ("terminate called without an active exception") while its peer still runs.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    exit_without_teardown()
