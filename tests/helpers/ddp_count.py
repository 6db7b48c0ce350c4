"""One optimizer step of a tiny Llama whose `compute_loss_func` divides by `num_items_in_batch`, with GradTrainer
and with the Trainer, under torchrun (2 processes, gloo, batch 2, accumulation 2); rank 0 saves both gradients.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_count.py OUT_FILE
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers as T  # noqa: E402

from hf_gradtools import GradTrainer  # noqa: E402
from tests.accumulation.test_accumulation_vs_trainer import ROWS, llama, summed_token_loss, train  # noqa: E402
from tests.conftest import exit_without_teardown  # noqa: E402


def main(out_file: str) -> None:
    grads = {}
    for trainer_cls in (GradTrainer, T.Trainer):
        steps = train(
            trainer_cls,
            llama,
            ROWS,
            2,
            2,
            Path(os.path.dirname(out_file)),
            trainer_kw={"compute_loss_func": summed_token_loss},
            ddp_backend="gloo",
        )
        grads[trainer_cls.__name__] = steps[0]
    if torch.distributed.get_rank() == 0:
        torch.save(grads, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
