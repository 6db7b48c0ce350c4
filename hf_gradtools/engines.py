"""Which training engine supports which gradient settings: one table, one check.

DeepSpeed, FSDP1 and XLA clip inside their own engines (L2 only): the Trainer's clipping runs unchanged there, so
every setting that needs `GradTrainer`'s own clipping step is refused. DeepSpeed and FSDP (both versions) build or
shard the optimizer and the gradients themselves, so the settings that change the optimizer's groups or read the
unreduced gradients are refused too. FSDP2 and DDP keep every tool.

Example:
    >>> from types import SimpleNamespace
    >>> engine_of(SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}))
    'FSDP2'
    >>> check_engine_support(SimpleNamespace(deepspeed="ds.json", clip_norm_type=1.0))
    Traceback (most recent call last):
    ...
    ValueError: `clip_norm_type`, `clip_grad_value` and `grad_snapshot_steps` are not supported with DeepSpeed, which clips inside its own engine (L2 only). Keep their defaults (2.0, None, 0), or use FSDP2 (`fsdp_config={'version': 2}`) or DDP.
"""  # noqa: E501

from __future__ import annotations

from typing import Any

from accelerate.utils import DistributedType

# The settings behind the Trainer's clipping step: its norm, value clipping, the snapshots it feeds.
CLIPPING_FIELDS = ("clip_norm_type", "clip_grad_value", "grad_snapshot_steps")
# The settings that add to every optimizer step (each needs the own clipping step), with the value that is off.
STEP_FIELDS = {
    "clip_algorithm": "norm",
    "skip_nonfinite_grads": False,
    "log_grad_norms": False,
    "grad_snapshot_tensors": [],
    "skip_spike_steps": False,
    "auto_freeze": False,
}
# The settings that build the optimizer's groups or read the gradients before the engine reduces them.
OPTIMIZER_FIELDS = ("layerwise_lr_decay", "gradual_unfreeze_steps", "log_grad_noise_scale")

# engine -> (clips inside itself, owns the optimizer and the gradients)
ENGINES = {
    "DeepSpeed": (True, True),
    "FSDP1": (True, True),
    "XLA": (True, False),
    "FSDP2": (False, True),
}


def engine_of(args: Any) -> str | None:
    """The engine `args` asks for: `DeepSpeed`, `FSDP1`, `FSDP2`, or `None` (DDP or one device)."""
    if getattr(args, "deepspeed", None):
        return "DeepSpeed"
    if getattr(args, "fsdp", None):
        version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
        return "FSDP1" if version == 1 else "FSDP2"
    return None


def engine_of_accelerator(accelerator) -> str | None:
    """The engine accelerate actually chose (settings may also come from the environment's accelerate config)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "FSDP1" if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2 else "FSDP2"
    return {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.XLA: "XLA"}.get(kind)


def engine_clips(engine: str | None) -> bool:
    """Whether `engine` clips inside itself (the Trainer's own clipping is then used unchanged)."""
    return ENGINES.get(engine, (False, False))[0]


def step_fields_set(settings: Any) -> list[str]:
    """The `STEP_FIELDS` of `settings` not at their off value."""
    return [name for name, off in STEP_FIELDS.items() if getattr(settings, name, off) != off]


def check_engine_support(args: Any, settings: Any = None, engine: str | None = None) -> None:
    """Refuse the settings `engine` (default: the one `args` asks for) cannot honour, before anything is touched.

    `settings`: those of `args` (its `GradSettings`), when resolved already; else read from `args`.

    Raises:
        ValueError: naming the fields, the engine, and what to do instead.
    """
    if args is None:
        return
    settings = args if settings is None else settings
    engine = engine_of(args) if engine is None else engine
    if not engine_clips(engine):
        return
    defaults = {"clip_norm_type": 2.0, "clip_grad_value": None, "grad_snapshot_steps": 0}
    if any(getattr(settings, name, off) != off for name, off in defaults.items()):
        raise ValueError(
            f"`clip_norm_type`, `clip_grad_value` and `grad_snapshot_steps` are not supported with {engine}, which "
            "clips inside its own engine (L2 only). Keep their defaults (2.0, None, 0), or use FSDP2 "
            "(`fsdp_config={'version': 2}`) or DDP."
        )
    changed = step_fields_set(settings)
    if changed:
        fields = ", ".join(f"`{name}`" for name in changed)
        raise ValueError(
            f"{fields} not supported with {engine}, which clips inside its own engine (L2 only). Keep the "
            "default, or use DDP or FSDP2 (`fsdp_config={'version': 2}`)."
        )


def check_optimizer_fields(settings: Any, args: Any) -> None:
    """Refuse `OPTIMIZER_FIELDS` not at their defaults, and the activation cache, under DeepSpeed or FSDP."""
    engine = engine_of(args)
    if not ENGINES.get(engine, (False, False))[1]:
        return
    if getattr(settings, "cache_frozen_activations", False):
        raise ValueError(
            f"`cache_frozen_activations`=True is not supported with {engine}, which shards the parameters: a "
            "process served from the cache would skip the frozen blocks' parameter gathers that the other "
            "processes wait for. Train with DDP or on one device, or leave it off."
        )
    defaults = {"layerwise_lr_decay": None, "gradual_unfreeze_steps": 0, "log_grad_noise_scale": False}
    used = [name for name in OPTIMIZER_FIELDS if getattr(settings, name) != defaults[name]]
    if used:
        name = "DeepSpeed" if engine == "DeepSpeed" else "FSDP"
        raise ValueError(
            f"{', '.join(f'`{name}`' for name in used)} are not supported with {name}, which builds or shards "
            "the optimizer and the gradients itself. Keep their defaults, or train with DDP or on one device."
        )
