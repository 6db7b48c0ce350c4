"""The frozen-activation cache under DDP (2 processes, gloo, shuffled): its hit rate and step time in the epochs after
the first, with the kept states shared between the processes and without, against no cache.

all-MiniLM-L6-v2 with a 2-class head on the first 512 SST-2 training sentences (at most 64 tokens), batch 32 a
process with dynamic padding, the embeddings and the first 4 layers frozen, `frozen_eval_mode`, 3 epochs; the
sampler deals the examples out anew each epoch. Variants, one `GradTrainer.train()` each, in one launch, order
reversed every other round; each ratio is the median over rounds of the round's ratio (rank 0's clock; the
processes wait for each other every step). Hit rates: rank 0's, per epoch, of the last round.

- `no cache`: `cache_frozen_activations` off.
- `cache, each process its own`: the cache without sharing (each process serves only the examples it computed).
- `cache, shared`: `cache_frozen_activations=True` as shipped: after every optimizer step each process sends the
  states it kept to the other.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/activation_cache_ddp.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers as T
from activation_cache import sst2  # this folder's: the same sentences, tokenized the same way
from freeze_vs_loop import load

from hf_gradtools import GradTrainer, GradTrainingArguments
from hf_gradtools.freezing.activation_cache import FrozenActivationCache

T.logging.set_verbosity_error()
VARIANTS = ("no cache", "cache, each process its own", "cache, shared")


class EpochClock(T.TrainerCallback):
    """Wall seconds of each epoch and the hit rate logged at its end."""

    def __init__(self):
        self.seconds, self.hit_rates = [], []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "activation_cache_hit_rate" in logs:
            self.hit_rates.append(logs["activation_cache_hit_rate"])


def run(variant: str, rows, tokenizer, out: str, epochs: int, batch: int) -> tuple[list[float], list[float]]:
    clock = EpochClock()
    steps = -(-len(rows) // (batch * int(os.environ.get("WORLD_SIZE", 1))))
    args = GradTrainingArguments(
        out,
        per_device_train_batch_size=batch,
        num_train_epochs=epochs,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,  # one log an epoch
        disable_tqdm=True,
        dataloader_pin_memory=False,
        freeze_embeddings=True,
        freeze_first_n_layers=4,
        frozen_eval_mode=True,
        cache_frozen_activations=variant != "no cache",
    )
    share = FrozenActivationCache.share_across_processes
    if variant == "cache, each process its own":
        FrozenActivationCache.share_across_processes = lambda self: None
    try:
        collator = T.DataCollatorWithPadding(tokenizer)
        trainer = GradTrainer(model=load(0), args=args, train_dataset=rows, data_collator=collator, callbacks=[clock])
        trainer.train()
    finally:
        FrozenActivationCache.share_across_processes = share
    return [s / steps for s in clock.seconds], clock.hit_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    variants = tuple(args.variants)
    torch.set_num_threads(1)
    tokenizer, rows = sst2(args.examples, 64)
    first: dict[str, list[float]] = {v: [] for v in variants}
    later: dict[str, list[float]] = {v: [] for v in variants}  # per round: the median step of the later epochs
    hits: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                out = os.path.join(tmp, str(r))
                per_step, rates = run(variant, rows, tokenizer, out, args.epochs, args.batch_size)
                first[variant].append(per_step[0])
                later[variant].append(statistics.median(per_step[1:]))
                hits[variant] = rates
    if torch.distributed.get_rank() == 0:
        print(
            f"{args.examples} SST-2 sentences, {torch.distributed.get_world_size()} processes x batch "
            f"{args.batch_size}, shuffled, {args.epochs} epochs, {args.rounds} rounds; embeddings + 4 layers frozen\n"
        )
        print(
            f"| variant | first epoch ms/step | later epochs ms/step | to `{variants[0]}` (range) | "
            "hit rate per epoch |"
        )
        print("|---|---:|---:|---:|---|")
        for variant in variants:
            ratios = [a / b for a, b in zip(later[variant], later[variants[0]], strict=True)]
            rates = ", ".join(f"{rate:.2f}" for rate in hits.get(variant, [])) or "-"
            print(
                f"| {variant} | {1000 * statistics.median(first[variant]):.0f} | "
                f"{1000 * statistics.median(later[variant]):.0f} | {statistics.median(ratios):.3f} "
                f"({min(ratios):.3f}-{max(ratios):.3f}) | {rates} |"
            )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
