"""Automatic freezing (AutoFreeze, Liu et al. 2021): freeze the layer stack's leading blocks once their gradient
norms stop changing, so the rest of the fine-tune does not pay for their backward pass (nor, with the activation
cache, their forward pass).

The rule (`auto_freeze=True`), on the blocks of the layer stack that freezing finds:

- `G_i(k)`: the sum, over the optimizer steps of interval `k` (`auto_freeze_interval` steps each), of block `i`'s
  L2 gradient norm before clipping;
- at the end of interval `k >= 2`, for the blocks unfrozen through both intervals, `r_i = |G_i(k) - G_i(k-1)| /
  G_i(k-1)`, and `tau` = the `auto_freeze_percentile` percentile of those `r_i` (linear interpolation, as
  `numpy.percentile`);
- starting at the lowest unfrozen block, each next block freezes while its `r_i < tau`, never one of the top
  `auto_freeze_keep_last` blocks, never the head; the embeddings freeze with block 0 (not when they are the
  output head too: tied weights, as GPT-2's, stay trainable, with one warning; a model without input embeddings
  freezes its blocks only).

A frozen block gets `requires_grad=False` and leaves the optimizer's stepping (its optimizer state is freed); with
`frozen_eval_mode` it trains in eval mode from the next step. `frozen_layers` (the blocks of the stack frozen now,
whoever froze them) is logged at every training log. Under DDP the norms are global (measured after the
all-reduce) and every process freezes what the main one decides; DDP must look for unused parameters
(`ddp_find_unused_parameters`, on by default for a transformers model), since a frozen block gives it no gradient.

Example:
    >>> previous = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}
    >>> current = {0: 10.1, 1: 10.3, 2: 12.0, 3: 15.0}
    >>> blocks, ratios, tau = blocks_to_freeze(previous, current, percentile=50.0, num_blocks=4, keep_last=1)
    >>> blocks, round(tau, 3)
    ([0, 1], 0.115)
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from ..atomic import write_json_atomic
from ..clipping import grad_norms
from ..components import ClipStep, TrainerComponent, warn_starts_afresh
from ..distributed import broadcast_from_main_, is_sharded
from ..engines import engine_of
from ..errors import LayerStackNotFoundError
from ..layout import find_input_embeddings, find_layer_stack
from ..snapshots import FROZEN_PARAMETERS_FILE, GradSnapshotCallback, describe_parameters
from ..state_fields import FieldReader
from .functions import tied_heads

logger = logging.getLogger(__name__)


def blocks_to_freeze(
    previous: dict[int, float], current: dict[int, float], percentile: float, num_blocks: int, keep_last: int
) -> tuple[list[int], dict[int, float], float]:
    """The blocks the rule freezes now, the ratios `r_i` and `tau`.

    Args:
        previous, current: `G_i(k-1)` and `G_i(k)` of the blocks unfrozen through both intervals.
        percentile: `auto_freeze_percentile`; num_blocks: the stack's length; keep_last: `auto_freeze_keep_last`.
    """
    ratios = {i: abs(current[i] - previous[i]) / previous[i] for i in sorted(current) if previous.get(i, 0) > 0}
    if not ratios:
        return [], ratios, float("nan")
    tau = float(np.percentile(list(ratios.values()), percentile))
    chosen = []
    for i in sorted(current):  # from the lowest unfrozen block up
        if i >= num_blocks - keep_last or i not in ratios or not ratios[i] < tau:
            break
        chosen.append(i)
    return chosen, ratios, tau


def check_auto_freeze(model: nn.Module, settings, args=None) -> None:
    """Refuse `auto_freeze` where the rule cannot run: `auto_freeze_keep_last` not below the layer count, FSDP or
    DeepSpeed (they shard and reduce the parameters they wrapped), or DDP that would wait for a frozen block's
    gradient (no unused-parameter detection, or a static graph)."""
    if not settings.auto_freeze:
        return
    blocks = len(find_layer_stack(model).blocks)
    keep = settings.auto_freeze_keep_last
    if keep >= blocks:
        raise ValueError(
            f"`auto_freeze_keep_last`={keep} must be below the layer count of {type(model).__name__} ({blocks} "
            "blocks): it keeps that many top blocks trainable, so nothing could ever freeze."
        )
    engine = engine_of(args)
    if engine is not None:
        raise ValueError(
            f"`auto_freeze`=True is not supported with {engine}, which shards and reduces the parameters it wrapped: "
            "a block frozen during training would still be waited for. Train with DDP or on one device, or set "
            "`freeze_first_n_layers` instead."
        )
    if getattr(args, "world_size", 1) <= 1:
        return
    if getattr(args, "ddp_static_graph", None):
        raise ValueError(
            "`auto_freeze`=True cannot run with `ddp_static_graph`=True: freezing a block changes the graph DDP "
            "recorded at the first step. Leave `ddp_static_graph` unset."
        )
    if not ddp_finds_unused_parameters(model, args):
        why = (
            "set so"
            if args.ddp_find_unused_parameters is not None
            else "the Trainer's choice when activation checkpointing is on"
        )
        raise ValueError(
            f"`auto_freeze`=True under DDP needs `ddp_find_unused_parameters`=True, and it is False here ({why}): DDP "
            "waits for a gradient of every parameter it wrapped, and a block frozen during training gives none. "
            "Set `ddp_find_unused_parameters=True`."
        )


def ddp_finds_unused_parameters(model: nn.Module, args) -> bool:
    """The `find_unused_parameters` the Trainer gives DDP: `ddp_find_unused_parameters` if set, else True except for
    a transformers model with activation checkpointing on."""
    if args.ddp_find_unused_parameters is not None:
        return bool(args.ddp_find_unused_parameters)
    if isinstance(model, PreTrainedModel):
        return not (model.is_activation_checkpointing or getattr(args, "activation_checkpointing", False))
    return True


def heads_tied_to_trainable_embeddings(model: nn.Module, embeddings: list | None = None) -> list[str]:
    """The output-head parameters that are the same tensors as the model's trainable input embeddings (none when
    it has no input embeddings the layout finds). `embeddings`: `find_input_embeddings(model)`, if at hand."""
    if embeddings is None:
        try:
            embeddings = find_input_embeddings(model)
        except LayerStackNotFoundError:
            return []
    names = [f"{name}.{n}" for name, module in embeddings for n, p in module.named_parameters() if p.requires_grad]
    return tied_heads(model, names)


def embeddings_to_freeze(model: nn.Module) -> list[nn.Module]:
    """The input embedding modules that automatic freezing freezes with block 0: none when the model has none (a
    model fed with features), and none, with a warning, when the output head is tied to them (never the head)."""
    try:
        embeddings = find_input_embeddings(model)
    except LayerStackNotFoundError as error:
        warnings.warn(
            f"`auto_freeze`=True will freeze only the blocks of {type(model).__name__}: {error}", stacklevel=2
        )
        return []
    tied = heads_tied_to_trainable_embeddings(model, embeddings)
    if tied:
        warnings.warn(
            f"`auto_freeze`=True leaves the input embeddings of {type(model).__name__} trainable: they are the same "
            f"tensor as the output head's {', '.join(tied)}, and automatic freezing never freezes the head. Its "
            "blocks still freeze. Untie the weights (`tie_word_embeddings=False`) to let the embeddings freeze "
            "with block 0, or set `freeze_embeddings=True` to freeze both.",
            stacklevel=2,
        )
        return []
    return [module for _, module in embeddings]


class AutoFreeze(TrainerComponent):
    """`auto_freeze`: the rule above, as a trainer component (decides at the end of each interval)."""

    name = "auto_freeze"
    every_step = True

    def __init__(self, settings):
        self.interval = settings.auto_freeze_interval
        self.percentile = settings.auto_freeze_percentile
        self.keep_last = settings.auto_freeze_keep_last
        self.norm_type = settings.clip_norm_type
        self.previous: dict[int, float] | None = None  # G(k-1) of the last complete interval
        self.sums: torch.Tensor | None = None  # G(k) so far, one per block, on the device
        self.frozen: list[int] = []  # the blocks this rule froze, in order
        self.frozen_at: list[int] = []  # the step at which each of them froze
        self.froze_embeddings = False
        self.decisions: list[dict] = []
        self._blocks: list[nn.Module] = []
        self._embeddings: list[nn.Module] = []
        self._record_due = False
        self._block_of: dict[int, int] = {}
        self._l2: torch.Tensor | None = None
        self._index: tuple[list[str], torch.Tensor, torch.Tensor] | None = None  # each parameter's block, cached

    @classmethod
    def from_args(cls, settings, model) -> AutoFreeze | None:
        return cls(settings) if settings.auto_freeze else None

    @staticmethod
    def block_frozen(block: nn.Module) -> bool:
        params = list(block.parameters())
        return bool(params) and not any(p.requires_grad for p in params)

    def frozen_layers(self) -> int:
        """The blocks of the stack frozen now, whoever froze them."""
        return sum(self.block_frozen(block) for block in self._blocks)

    def on_train_begin(self, trainer) -> None:
        self._blocks = list(find_layer_stack(trainer.model).blocks)
        self._embeddings = embeddings_to_freeze(trainer.model)
        self._block_of = {id(p): i for i, block in enumerate(self._blocks) for p in block.parameters()}
        self.sums, self.previous, self.frozen, self.froze_embeddings, self.decisions = None, None, [], False, []
        self.frozen_at = []

    def before_clip(self, trainer, step: ClipStep) -> None:
        self._l2 = None
        if self.norm_type != 2.0:  # the rule reads L2 norms; the step measures in `clip_norm_type`
            self._l2 = grad_norms([p.grad for p in step.params], 2.0)

    def after_clip(self, trainer, step: ClipStep) -> None:
        if step.skipped:
            return  # a skipped step's gradients are not the run's
        norms = self._l2 if self._l2 is not None else step.result.param_norms
        if self._index is None or self._index[0] != step.names:
            index = [self._block_of.get(id(p), -1) for p in step.params]
            inside = torch.tensor([i >= 0 for i in index], device=norms.device)
            self._index = (step.names, inside, torch.tensor([max(i, 0) for i in index], device=norms.device))
        _, inside, blocks = self._index
        squares = torch.zeros(len(self._blocks), device=norms.device, dtype=torch.float64)
        squares.index_add_(0, blocks, torch.where(inside, norms.double().square(), torch.zeros_like(norms.double())))
        block_norms = squares.sqrt()
        self.sums = block_norms if self.sums is None else self.sums + block_norms

    def on_step_end(self, trainer) -> None:
        if self._record_due:  # resumed: the record as frozen now (one of later decisions is from the lost run)
            self._record_due = False
            self._write_record(trainer)
        step = trainer.state.global_step
        if step % self.interval:
            return
        unfrozen = [i for i, block in enumerate(self._blocks) if not self.block_frozen(block)]
        if self.sums is not None:  # under DDP every process freezes what the main one decides
            broadcast_from_main_(self.sums)
        sums = self.sums.tolist() if self.sums is not None else [0.0] * len(self._blocks)
        current = {i: sums[i] for i in unfrozen}
        self.sums = None
        if self.previous is not None:
            self._decide(trainer, step, {i: v for i, v in self.previous.items() if i in current}, current)
        self.previous = {i: v for i, v in current.items() if not self.block_frozen(self._blocks[i])}

    def _decide(self, trainer, step: int, previous: dict[int, float], current: dict[int, float]) -> None:
        chosen, ratios, tau = blocks_to_freeze(
            previous, {i: current[i] for i in previous}, self.percentile, len(self._blocks), self.keep_last
        )
        for i in chosen:
            self._freeze(trainer, self._blocks[i])
        embeddings_now = False
        if 0 in chosen:
            for module in self._embeddings:
                if any(p.requires_grad for p in module.parameters()):
                    self._freeze(trainer, module)
                    self.froze_embeddings = embeddings_now = True
        self.frozen += chosen
        self.frozen_at += [step] * len(chosen)
        self.decisions.append({"step": step, "froze": chosen, "tau": tau, "ratios": ratios})
        if chosen:
            self._write_record(trainer)
        logger.info(
            "hf_gradtools: step %d: automatic freezing %s (r = %s, tau = %.4g); %d of %d blocks frozen.",
            step,
            f"froze {', '.join(['embeddings'] * embeddings_now + [f'layer.{i}' for i in chosen])}"
            if chosen
            else "froze nothing",
            ", ".join(f"layer.{i}: {r:.4g}" for i, r in ratios.items()),
            tau,
            self.frozen_layers(),
            len(self._blocks),
        )

    def _write_record(self, trainer) -> None:
        """`frozen_parameters.json` as the model is frozen now, with the blocks frozen at each decision (main process
        only, atomically)."""
        if not trainer.is_world_process_zero():
            return
        record = describe_parameters(trainer.model)
        history: dict[int, list[str]] = {}
        for block, step in zip(self.frozen, self.frozen_at, strict=False):  # steps: absent from older checkpoints
            with_embeddings = block == 0 and self.froze_embeddings
            history.setdefault(step, []).extend(["embeddings"] * with_embeddings + [f"layer.{block}"])
        record["auto_freeze_history"] = [{"step": step, "froze": blocks} for step, blocks in history.items()]
        writers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradSnapshotCallback)]
        for callback in writers:  # its queue writes the file too: one order of writes
            callback.rewrite_record(trainer.args, record)
        if not writers:
            write_json_atomic(os.path.join(trainer.args.output_dir, FROZEN_PARAMETERS_FILE), record)

    @staticmethod
    def _freeze(trainer, module: nn.Module) -> None:
        """`requires_grad=False`, no gradient, no optimizer state: the optimizer leaves it alone from now on."""
        state = getattr(trainer.optimizer, "state", None)
        for param in module.parameters():
            param.requires_grad_(False)
            param.grad = None
            if state is not None:
                state.pop(param, None)

    def log_entries(self, trainer) -> dict[str, float]:
        return {"frozen_layers": self.frozen_layers()}

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        return {
            "previous": None if self.previous is None else {str(i): v for i, v in self.previous.items()},
            "sums": None if self.sums is None else self.sums.tolist(),
            "frozen": list(self.frozen),
            "frozen_at": list(self.frozen_at),
            "froze_embeddings": self.froze_embeddings,
        }

    @staticmethod
    def check_state(state) -> dict:
        """`state` as `state_dict()` writes it, or `StateFieldError` naming the field."""
        fields = FieldReader(state, "the automatic freezing state")
        previous = fields._get("previous")
        fields.check(
            previous is None
            or (isinstance(previous, dict) and all(k.isdigit() and _is_norm(v) for k, v in previous.items())),
            "previous",
            "must be null or an object of block index -> non-negative norm sum",
        )
        sums = fields._get("sums")
        fields.check(
            sums is None or (isinstance(sums, list) and all(_is_norm(v) for v in sums)),
            "sums",
            "must be null or a list of non-negative norm sums",
        )
        frozen = fields._get("frozen")
        fields.check(
            isinstance(frozen, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in frozen),
            "frozen",
            "must be a list of block indices",
        )
        if "frozen_at" in state:  # written since automatic freezing records its decisions' steps
            frozen_at = fields._get("frozen_at")
            fields.check(
                isinstance(frozen_at, list)
                and len(frozen_at) == len(frozen)
                and all(_is_index(step) for step in frozen_at),
                "frozen_at",
                "must be a list of steps, one per frozen block",
            )
        fields.boolean("froze_embeddings")
        fields.done()
        return state

    def load_state_dict(self, state, trainer) -> None:
        if state is None:
            warn_starts_afresh(trainer, self.name)
            return
        state = self.check_state(state)
        if any(i >= len(self._blocks) for i in state["frozen"]) or (
            state["sums"] is not None and len(state["sums"]) != len(self._blocks)
        ):
            raise ValueError(
                f"the checkpoint's automatic freezing state is for another layer stack than this model's "
                f"{len(self._blocks)} blocks."
            )
        self.previous = None if state["previous"] is None else {int(k): v for k, v in state["previous"].items()}
        self.sums = None if state["sums"] is None else torch.tensor(state["sums"], dtype=torch.float64)
        self.frozen, self.froze_embeddings = list(state["frozen"]), state["froze_embeddings"]
        self.frozen_at = list(state.get("frozen_at", []))
        for i in self.frozen:
            self._freeze(trainer, self._blocks[i])
        if self.froze_embeddings:
            for _, module in find_input_embeddings(trainer.model):
                self._freeze(trainer, module)  # as saved, even if this model's head is tied to them now
        self._record_due = True  # written at the first step: after the snapshot callback's record of train begin
        if self.sums is not None and not is_sharded([p for p in trainer.model.parameters()]):
            self.sums = self.sums.to(next(trainer.model.parameters()).device)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_norm(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and value == value
