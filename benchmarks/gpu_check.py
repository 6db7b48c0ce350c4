"""What only a GPU shows: fp16/bf16 autocast with clipping and the grad scaler, and the overhead on CUDA.

Run on a CUDA machine (no Hub access needed: the model is a randomly initialised BERT shaped like
all-MiniLM-L6-v2, 6 layers, hidden 384):

    python benchmarks/gpu_check.py --output outputs/gpu

Checks (each prints PASS/FAIL; the exit status is the number of failures):
1. fp16 with the grad scaler: the logged `grad_norm` is the unscaled norm (the plain Trainer's, and the fp32
   run's to within autocast noise), snapshots agree with it, clipping bounds the unscaled gradient, parameters stay
   finite.
2. bf16 autocast: the same, without a scaler.
3. Value clipping under fp16: every element of the unscaled gradient is within [-v, v] at the optimizer step.
4. Exact accumulation on CUDA: (batch 16, accumulation 1) and (batch 4, accumulation 4) give one gradient.
5. Timing, interleaved (A B A B): plain Trainer vs GradTrainer, and GradTrainer with and without snapshots.
6. The spike guard adds no host sync: `zclip` + `skip_spike_steps` (bf16, the fused AdamW) with
   `torch.cuda.set_sync_debug_mode("error")` around each step's clipping, guards and optimizer step, a spike
   injected at step 12 and skipped (parameters unchanged across it); the host's decision, as a control, must trip
   the same check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import transformers as T

from hf_gradtools import GradTrainer, GradTrainingArguments, load_grad_snapshots

T.logging.set_verbosity_error()
FAILURES: list[str] = []
RESULTS: dict = {}


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    RESULTS.setdefault("checks", []).append({"name": name, "ok": bool(ok), "detail": detail})
    if not ok:
        FAILURES.append(name)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000, 30000, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def minilm_shaped(seed: int = 0) -> T.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = T.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return T.BertForSequenceClassification(config)


def args_for(out: str, plain: bool = False, **kw):
    base = dict(
        output_dir=out,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        learning_rate=5e-5,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    if plain:
        return T.TrainingArguments(**{k: v for k, v in base.items() if k in T.TrainingArguments.__dataclass_fields__})
    return GradTrainingArguments(**base)


class Capture(T.TrainerCallback):
    def __init__(self):
        self.max_abs, self.grads = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.max_abs.append(max(g.abs().max().item() for g in grads))
        if state.global_step == 0:
            self.grads.append(
                {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
            )


def grad_norms_of(trainer) -> list[float]:
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


def mixed_precision_checks(out: str, data, precisions=("fp32", "fp16", "bf16")) -> None:
    runs = {}
    for precision in precisions:
        flags = {"fp16": precision == "fp16", "bf16": precision == "bf16"}
        common = dict(per_device_train_batch_size=16, max_steps=6, max_grad_norm=0.5, **flags)
        ours = GradTrainer(
            model=minilm_shaped(),
            args=args_for(f"{out}/{precision}", grad_snapshot_steps=1, **common),
            train_dataset=data,
        )
        ours.train()
        plain = T.Trainer(
            model=minilm_shaped(), args=args_for(f"{out}/{precision}-plain", plain=True, **common), train_dataset=data
        )
        plain.train()
        runs[precision] = (grad_norms_of(ours), grad_norms_of(plain), load_grad_snapshots(f"{out}/{precision}"), ours)
    fp32_first = runs["fp32"][0][0]
    for precision in precisions:
        ours, plain, snaps, trainer = runs[precision]
        finite = [n for n in ours if math.isfinite(n)]
        plain_finite = [(a, b) for a, b in zip(ours, plain, strict=True) if math.isfinite(a) and math.isfinite(b)]
        check(
            f"{precision}: grad_norm equals the plain Trainer's (L2, accumulation 1)",
            all(math.isclose(a, b, rel_tol=2e-2) for a, b in plain_finite) and len(plain_finite) >= 3,
            f"ours={[round(x, 4) for x in ours]} plain={[round(x, 4) for x in plain]}",
        )
        check(
            f"{precision}: first grad_norm is unscaled (close to fp32)",
            math.isclose(finite[0], fp32_first, rel_tol=5e-2),
            f"{finite[0]:.4f} vs fp32 {fp32_first:.4f}",
        )
        check(
            f"{precision}: snapshots match the logged norm and clip to max_grad_norm",
            len(snaps) == 6
            and all(
                (not math.isfinite(s["total_norm_pre_clip"]))
                or (
                    math.isclose(s["total_norm_pre_clip"], g, rel_tol=1e-5) and s["total_norm_post_clip"] <= 0.5 + 1e-3
                )
                for s, g in zip(snaps, ours, strict=True)
            ),
            f"pre={[round(s['total_norm_pre_clip'], 4) for s in snaps]} "
            f"post={[round(s['total_norm_post_clip'], 4) for s in snaps]}",
        )
        check(
            f"{precision}: parameters finite after training",
            all(torch.isfinite(p).all() for p in trainer.model.parameters()),
            "",
        )


def value_clip_check(out: str, data) -> None:
    capture = Capture()
    args = args_for(
        f"{out}/value", per_device_train_batch_size=16, max_steps=4, fp16=True, max_grad_norm=0.0, clip_grad_value=1e-3
    )
    GradTrainer(model=minilm_shaped(), args=args, train_dataset=data, callbacks=[capture]).train()
    check(
        "fp16: value clipping bounds the unscaled gradient",
        all(m <= 1e-3 * (1 + 1e-3) for m in capture.max_abs),
        f"max |grad| per step = {capture.max_abs}",
    )


def accumulation_check(out: str, data) -> None:
    grads = []
    for batch, acc in ((16, 1), (4, 4)):
        capture = Capture()
        args = args_for(
            f"{out}/acc{acc}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=acc,
            max_steps=1,
            max_grad_norm=0.0,
            learning_rate=0.0,
        )
        GradTrainer(model=minilm_shaped(), args=args, train_dataset=data, callbacks=[capture]).train()
        grads.append(capture.grads[0])
    # Relative to the largest gradient element: some gradients are zero up to rounding (attention key biases).
    scale = max(g.abs().max().item() for g in grads[0].values())
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) / scale
    check(
        "CUDA fp32: accumulation 4 x 4 equals batch 16",
        worst < 1e-4,
        f"largest difference / largest element {worst:.2e}",
    )


class StepTimer(T.TrainerCallback):
    """Wall time of each optimizer step, from its first micro-batch to the end of the step (synchronised)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._start is None:
            torch.cuda.synchronize()
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self._start)
        self._start = now


def timed(trainer_cls, out, data, steps, plain=False, **kw):
    timer = StepTimer()
    args = args_for(
        out,
        plain=plain,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=4,
        max_steps=steps,
        max_grad_norm=1.0,
        bf16=True,
        logging_steps=10_000,
        **kw,
    )
    trainer_cls(model=minilm_shaped(), args=args, train_dataset=data, callbacks=[timer]).train()
    return statistics.median(timer.times[3:])  # skip warm-up steps


def timing(out: str, data, rounds: int, steps: int) -> None:
    pairs = {
        "GradTrainer / Trainer": (
            lambda: timed(T.Trainer, f"{out}/t-plain", data, steps, plain=True),
            lambda: timed(GradTrainer, f"{out}/t-ours", data, steps),
        ),
        "snapshots every step / none": (
            lambda: timed(GradTrainer, f"{out}/t-ours", data, steps),
            lambda: timed(GradTrainer, f"{out}/t-snap", data, steps, grad_snapshot_steps=1),
        ),
    }
    for name, (a, b) in pairs.items():
        ratios, a_times, b_times = [], [], []
        for _ in range(rounds):
            ta, tb = a(), b()
            a_times.append(ta)
            b_times.append(tb)
            ratios.append(tb / ta)
        ratio = statistics.median(ratios)
        RESULTS.setdefault("timing", {})[name] = {
            "a_ms": [t * 1e3 for t in a_times],
            "b_ms": [t * 1e3 for t in b_times],
            "ratio_median": ratio,
        }
        print(
            f"TIME {name}: A {statistics.median(a_times) * 1e3:.2f} ms, B {statistics.median(b_times) * 1e3:.2f} ms "
            f"per optimizer step (batch 32 x 4, seq 128, bf16); ratio {ratio:.3f} "
            f"(rounds {[round(r, 3) for r in ratios]})",
            flush=True,
        )


class SyncChecked(GradTrainer):
    """Raises (CUDA's sync check, "error") on any host sync in the clipping, the guards and the optimizer step from
    step `FROM` on (the first steps copy indices and state to the device once); multiplies the loss by 1000 at
    step `SPIKE`."""

    SPIKE, FROM = 12, 3

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * 1000.0 if model.training and self.state.global_step + 1 == self.SPIKE else loss

    def _clip_and_record(self):
        if self.state.global_step + 1 >= self.FROM:
            torch.cuda.set_sync_debug_mode("error")
        try:
            return super()._clip_and_record()
        finally:
            torch.cuda.set_sync_debug_mode("default")


class SyncCheckedStep(T.TrainerCallback):
    def __init__(self):
        self.params = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 >= SyncChecked.FROM:
            torch.cuda.set_sync_debug_mode("error")

    def on_optimizer_step(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def spike_guard_sync_check(out: str, data) -> None:
    from hf_gradtools.guards import SkipSpikes

    for on_device in (True, False):
        SkipSpikes.decide_on_device = on_device
        steps = SyncCheckedStep()
        args = args_for(
            os.path.join(out, f"spike_sync_{on_device}"),
            bf16=True,
            optim="adamw_torch_fused",
            max_steps=20,
            per_device_train_batch_size=4,
            logging_steps=5,
            logging_nan_inf_filter=False,
            skip_spike_steps=True,
            spike_min_history=8,
            spike_window=16,
            clip_algorithm="zclip",
            zclip_warmup_steps=5,
            max_grad_norm=1.0,
        )
        trainer = SyncChecked(model=minilm_shaped().cuda(), args=args, train_dataset=data, callbacks=[steps])
        try:
            trainer.train()
            error = None
        except RuntimeError as e:  # the sync check's error
            error = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if on_device:
            skips = [h.get("spike_skips") for h in trainer.state.log_history if "loss" in h]
            before, after = steps.params.get(SyncChecked.SPIKE - 1, {}), steps.params.get(SyncChecked.SPIKE, {})
            same = error is None and all(torch.equal(after[n], v) for n, v in before.items())
            check(
                "spike guard on the device: no host sync",
                error is None and same and skips[-1] == 1,
                f"error={error}, spike_skips={skips}, parameters unchanged across the skip: {same}",
            )
        else:
            check("spike guard on the host (control): the sync check trips", error is not None, f"error={error}")
    SkipSpikes.decide_on_device = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/gpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip-timing", action="store_true")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device: this check needs a GPU.")
        return 2
    os.makedirs(opts.output, exist_ok=True)
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["versions"] = {"torch": torch.__version__, "transformers": T.__version__}
    print(RESULTS["device"], RESULTS["versions"], flush=True)
    small = Rows(96, 128)
    mixed_precision_checks(opts.output, small)
    value_clip_check(opts.output, small)
    accumulation_check(opts.output, small)
    spike_guard_sync_check(opts.output, small)
    if not opts.skip_timing:
        timing(opts.output, Rows(32 * 4 * opts.steps, 128, seed=1), opts.rounds, opts.steps)
    with open(os.path.join(opts.output, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(RESULTS, f, indent=1)
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all GPU checks passed")
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
