"""The logged loss and grad_norm of a tiny BERT classifier under 2-process DDP, for `Trainer` and `GradTrainer`,
next to one process with the same global batch.

Run on CPU, from the repository root (gloo; about 20 s):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/ddp_vs_trainer.py

Each of the 2 processes takes 2 rows per step; the first process then runs this script again alone (batch 4, the
same 4 rows per step) and prints both. Run alone (`python benchmarks/ddp_vs_trainer.py`), it prints the one-process
numbers only. `--json FILE` also writes them as JSON; `--out DIR` keeps GradTrainer's checkpoints (one per step) in
`DIR/world<N>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers as T
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_gradtools import GradTrainer, GradTrainingArguments  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 2
# Set by torchrun; removed for the one-process run that the first process starts.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR")


def build_model() -> T.PreTrainedModel:
    """A 3-layer BERT classifier of hidden size 16, no dropout, the same weights in every process."""
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return T.AutoModelForSequenceClassification.from_config(config)


def dataset() -> Dataset:
    g = torch.Generator().manual_seed(1)
    rows = GLOBAL_BATCH * STEPS
    ids = torch.randint(3, 64, (rows, 12), generator=g)
    labels = torch.randint(0, 2, (rows,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def make_args(args_class: type, output_dir: str, world: int, save: bool) -> T.TrainingArguments:
    return args_class(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,  # no clipping: the logged grad_norm is the gradient the optimizer gets
        logging_steps=1,
        report_to="none",
        save_strategy="steps" if save else "no",
        save_steps=1,
        use_cpu=True,
        train_sampling_strategy="sequential",  # both processes' rows of a step = the one process's rows
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
        seed=0,
        ddp_find_unused_parameters=False,
    )


def train(trainer_class: type, output_dir: str, world: int) -> list[dict]:
    """The logged loss and grad_norm of every step."""
    is_grad = trainer_class is GradTrainer
    args = make_args(GradTrainingArguments if is_grad else T.TrainingArguments, output_dir, world, save=is_grad)
    trainer = trainer_class(model=build_model(), args=args, train_dataset=dataset())
    trainer.remove_callback(T.trainer_callback.PrinterCallback)  # the table below says it once
    trainer.train()
    return [{"loss": h["loss"], "grad_norm": h["grad_norm"]} for h in trainer.state.log_history if "loss" in h]


def one_process(out: str) -> dict:
    """Run this script alone (no torchrun variables) and return its numbers."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC")}
    env.pop("MASTER_PORT", None)
    result = os.path.join(out, "world1.json")
    done = subprocess.run([sys.executable, __file__, "--json", result, "--out", out], env=env, capture_output=True)
    if done.returncode:
        raise RuntimeError(done.stderr.decode()[-3000:])
    with open(result) as f:
        return json.load(f)["world1"]


def table(results: dict) -> str:
    lines = ["| run | trainer | step | loss | grad_norm |", "|---|---|---:|---:|---:|"]
    for key, label in (("world2", "2 processes x batch 2"), ("world1", "1 process x batch 4")):
        for trainer in ("Trainer", "GradTrainer"):
            for step, logged in enumerate(results.get(key, {}).get(trainer, []), start=1):
                lines.append(f"| {label} | {trainer} | {step} | {logged['loss']:.4f} | {logged['grad_norm']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--out", help="folder for the runs' output (default: a temporary folder)")
    parser.add_argument("--no_reference", action="store_true", help="under torchrun: skip the one-process run")
    options = parser.parse_args()
    T.logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as scratch:
        out = options.out or scratch
        key = f"world{world}"
        results = {
            key: {
                cls.__name__: train(cls, os.path.join(out, key, cls.__name__), world)
                for cls in (T.Trainer, GradTrainer)
            }
        }
        if torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            if rank != 0:
                return
            if not options.no_reference:
                results["world1"] = one_process(out)
        print(table(results))
        if options.json:
            with open(options.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
