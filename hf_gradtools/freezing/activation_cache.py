"""Keep each training example's output of the frozen prefix and skip computing it again.

With the input embeddings and the first K blocks of the layer stack frozen and in eval mode, the hidden states
that reach block K are a fixed function of the example: the first time a training example is seen its states at
the input of block K (its unpadded positions, in the dtype they were computed in) are kept; when every example of
a later micro-batch is kept, the model's own forward runs as usual but the embeddings and blocks 0..K-1 are not
called: stand-ins take their places in the model for that forward (an embedding stand-in returns zeros of the
batch's shape, a skipped block passes its input on), and block K receives the kept states, padded again to this
batch's length and padding side. The model's forward still builds everything else the later blocks need from the
batch: attention masks, rotary or relative position embeddings (DeBERTa's `rel_embeddings`, MPNet's position
bias), ModernBERT's sliding-window masks.

Examples are recognised by what the frozen prefix reads: the token ids at the positions `attention_mask` keeps,
those positions, the token types and the position ids (given, or counted from the ids as RoBERTa does). Shuffling,
the collator and dynamic padding (another pad length each epoch) do not matter; left padding of a model with
absolute positions gives other positions, so another example. A micro-batch is served only when all its examples
are kept (otherwise it is computed normally and the missing ones are kept). When the prefix has grown since some
were kept, the micro-batch starts at the shallowest depth kept among them, and the deeper examples' kept states
replace their rows at the input of the block they were kept for: only the newly frozen blocks run. A served
micro-batch gives what the uncached forward gives, up to float rounding of other matrix shapes: the same loss, the
same gradients, and the same random numbers drawn (a frozen block in eval mode draws none). Outputs at padded
positions are not the uncached ones (the kept states hold only unpadded positions, padding gets zeros): a
micro-batch is served only when the loss cannot read them (`_padding_reason`: token labels there are -100, as
collators set them; a sequence head reads a token, not padding; no row is all padding) and when no call around the
base model asks for every block's output. The examples are those the model's forward is called with.
Past the memory budget new examples are computed as without the cache (one warning).

The kept states are stored on the CPU by default: host memory is the larger pool, and the budget would otherwise
compete with training for accelerator memory; a served micro-batch copies `batch x tokens x hidden` numbers to the
device once, far less than the K blocks' matrix products it replaces.

Supported architectures (the model's forward and blocks are known, see `ARCHITECTURES`): BERT, RoBERTa,
XLM-RoBERTa, ELECTRA, DistilBERT, MPNet, DeBERTa-v2/v3, ModernBERT, GPT-2, Llama, Qwen2. Any other is refused by
name. Needs only `model.config.model_type` and the structure `layout.find_layer_stack` reads.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_gradtools import freeze_embeddings, freeze_first_n_layers
    >>> _ = torch.manual_seed(0)
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=2, intermediate_size=32, vocab_size=100))
    >>> _ = freeze_embeddings(model), freeze_first_n_layers(model, 2)
    >>> _ = model.bert.embeddings.eval(), model.bert.encoder.layer[:2].eval()
    >>> cache = FrozenActivationCache.from_model(model, num_frozen_blocks=2, budget_bytes=10**8)
    >>> batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
    ...     "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), "labels": torch.tensor([0, 1])}
    >>> for _ in range(2):
    ...     with cache.serving(batch):
    ...         model(**batch).loss.backward()
    ...     print(cache.stats()["activation_cache_hit_rate"], len(cache))  # kept on the first pass, then served
    0.0 2
    1.0 2
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..components import TrainerComponent
from ..layout import find_input_embeddings, find_layer_stack
from .auto import heads_tied_to_trainable_embeddings

GB = 1e9  # bytes in a GB, as `frozen_activation_cache_gb` counts them

# Batch entries that do not change the frozen prefix's output: the labels are checked apart (`_padding_reason`).
INERT_INPUTS = frozenset({"labels", "num_items_in_batch", "return_dict", "use_cache"})
PREFIX_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})
OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")  # ask for what the skipped blocks return


@dataclass(frozen=True)
class Architecture:
    """What the cache must know of an architecture's forward beyond `find_layer_stack`.

    Attributes:
        block: class name of the layer stack's blocks (checked, so a look-alike model is refused).
        output: what a block returns: `"tensor"` (the hidden states), `"tuple"` (`(hidden_states,)`, MPNet) or
            `"pair"` (`(hidden_states, attention)`, DeBERTa-v2).
        positions_from_ids: the position ids count the non-padding ids (RoBERTa, XLM-R, MPNet), rather than being
            the index in the row.
        shared: modules beside the stack (attribute names on its parent) that the frozen blocks use as well: they
            must be frozen and in eval mode too (DeBERTa's relative embeddings and their LayerNorm, MPNet's
            relative attention bias, GPT-2's dropout after the embeddings).
        skipped: of `shared`, those the model calls only inside the prefix, with the index of the argument their
            stand-in returns (DeBERTa's `conv`, applied after block 0: `conv(embeddings, block_0_output, mask)`).
        pads_with_pad_id: the sequence-classification head finds the last token by `config.pad_token_id`, so a
            masked position must hold that id.
    """

    block: str
    output: str = "tensor"
    positions_from_ids: bool = False
    shared: tuple[str, ...] = ()
    skipped: tuple[tuple[str, int], ...] = ()
    pads_with_pad_id: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("BertLayer"),
    "roberta": Architecture("RobertaLayer", positions_from_ids=True),
    "xlm-roberta": Architecture("XLMRobertaLayer", positions_from_ids=True),
    "electra": Architecture("ElectraLayer"),
    "distilbert": Architecture("TransformerBlock"),
    "mpnet": Architecture("MPNetLayer", output="tuple", positions_from_ids=True, shared=("relative_attention_bias",)),
    "deberta-v2": Architecture(
        "DebertaV2Layer", output="pair", shared=("rel_embeddings", "LayerNorm", "conv"), skipped=(("conv", 1),)
    ),
    "modernbert": Architecture("ModernBertEncoderLayer"),
    "gpt2": Architecture("GPT2Block", shared=("drop",), pads_with_pad_id=True),
    "llama": Architecture("LlamaDecoderLayer", pads_with_pad_id=True),
    "qwen2": Architecture("Qwen2DecoderLayer", pads_with_pad_id=True),
}


class _StandIn(nn.Module):
    """Takes a skipped module's place in the model while a micro-batch is served.

    `output(args, kwargs)` gives what it returns; attributes the model's forward reads on the module it stands for
    (ModernBERT's `attention_type`) are read through. The original is not registered as a child, so nothing walks
    into it (or fires its hooks) while it is out of the model.
    """

    def __init__(self, original: nn.Module, output: Callable[[tuple, dict], Any]):
        super().__init__()
        self.__dict__["_original"] = original
        self.__dict__["_output"] = output

    def forward(self, *args, **kwargs):
        return self._output(args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)

    def extra_repr(self) -> str:
        return f"for {type(self._original).__name__}"


@dataclass
class _Entry:
    depth: int  # the states are the input of block `depth`
    states: torch.Tensor  # (unpadded tokens, hidden)


@dataclass
class _Plan:
    """What one micro-batch does: the states to feed, and which examples to keep, at which depth."""

    keys: list[tuple]
    shape: tuple[int, int]
    mask: torch.Tensor | None  # bool (batch, length) on the model's device; None: no padding
    depth: int = 0  # 0: computed normally; else the states are fed into block `depth`
    states: torch.Tensor | None = None  # (batch, length, hidden), padded again
    # deeper kept examples: depth -> (rows, a bool (batch,) tensor; their states, padded again), put in at that depth
    deeper: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    keep_rows: list[int] | None = None  # rows whose states at block K are kept


def _block_output(kind: str, hidden: torch.Tensor):
    if kind == "tuple":
        return (hidden,)
    if kind == "pair":
        return hidden, None
    return hidden


def _hidden_of(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _first_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class FrozenActivationCache:
    """Per-example cache of the frozen prefix's output (the embeddings and the first K blocks) of one model.

    Build it with `from_model`; wrap each training micro-batch's forward and backward in `serving(inputs)`.
    Outside `serving` the model is untouched: no hook, no stand-in.

    Attributes:
        budget_exceeded_warned: the budget was reached (and said so, once): examples not kept by then are
            computed as without the cache.
    """

    def __init__(
        self,
        model: nn.Module,
        architecture: Architecture,
        num_frozen_blocks: int,
        budget_bytes: float,
        device: str | torch.device = "cpu",
    ):
        self.model = model
        self.architecture = architecture
        self.stack = find_layer_stack(model)
        self.blocks = self.stack.blocks
        parent_name = self.stack.name.rpartition(".")[0]
        self._stack_parent = model.get_submodule(parent_name)
        self._embeddings = find_input_embeddings(model)
        modules = dict(model.named_modules())
        self._embedding_slots = [
            (modules[name.rpartition(".")[0]], name.rpartition(".")[2], module) for name, module in self._embeddings
        ]
        self._shared = [
            (f"{parent_name}.{attribute}".lstrip("."), getattr(self._stack_parent, attribute))
            for attribute in architecture.shared
            if isinstance(getattr(self._stack_parent, attribute, None), nn.Module)
        ]
        self._skipped_shared = [
            (attribute, index)
            for attribute, index in architecture.skipped
            if isinstance(getattr(self._stack_parent, attribute, None), nn.Module)
        ]
        self._padding_idx = getattr(self._embeddings[0][1], "padding_idx", None)
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self.budget_exceeded_warned = False
        self._entries: dict[tuple, _Entry] = {}
        self._bytes = 0
        self._seen = 0
        self._hits = 0
        self._warned: set[str] = set()
        self._versions: dict[int, tuple[int, int]] = {}
        self._context: tuple | None = None
        self._k = 0
        self._states_require_grad = False
        self._new: list[tuple[tuple, _Entry]] | None = None  # kept since the last `share_new_entries`; None: off
        self.set_prefix(num_frozen_blocks)

    @classmethod
    def from_model(
        cls, model: nn.Module, num_frozen_blocks: int, budget_bytes: float, device: str | torch.device = "cpu"
    ) -> FrozenActivationCache:
        """A cache for `model` whose embeddings and first `num_frozen_blocks` blocks are (or will be) frozen.

        `budget_bytes` bounds the kept states (and their keys); `device` is where they are kept (the CPU by default,
        see the module docstring). The prefix must be frozen and in eval mode only when a micro-batch is served:
        until then (or whenever it is not) `serving` computes normally.

        Raises:
            ValueError: the architecture is not one of `ARCHITECTURES` (named, with the supported ones), its
                structure is not what that architecture has, `num_frozen_blocks` is not 0 to the number of blocks,
                or `budget_bytes` is not a positive number.
        """
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or not budget_bytes > 0:
            raise ValueError(f"`budget_bytes` must be a positive number of bytes, got {budget_bytes!r}.")
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        supported = ", ".join(sorted(ARCHITECTURES))
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"The frozen-activation cache does not support {type(model).__name__} (model_type {model_type!r}): "
                f"it skips the frozen blocks only where it knows what the model's forward builds around them. "
                f"Supported model types: {supported}. Train without `cache_frozen_activations`."
            )
        architecture = ARCHITECTURES[model_type]
        blocks = find_layer_stack(model).blocks
        found = type(blocks[0]).__name__
        if found != architecture.block:
            raise ValueError(
                f"The frozen-activation cache expects {architecture.block} blocks in a {model_type} model, but "
                f"{type(model).__name__} has {found} blocks: its forward may differ from the one the cache knows, "
                "so it is refused. Train without `cache_frozen_activations`."
            )
        if model_type == "deberta-v2":
            _check_deberta(model, len(blocks))
        return cls(model, architecture, num_frozen_blocks, budget_bytes, device)

    # --- the prefix ---------------------------------------------------------------------------------------------

    @property
    def num_frozen_blocks(self) -> int:
        return self._k

    def set_prefix(self, num_frozen_blocks: int) -> None:
        """Serve the embeddings and the first `num_frozen_blocks` blocks from now on (0: nothing is served).

        More blocks than before: the kept states are carried on lazily, by running only the newly frozen blocks on
        them the next time a micro-batch holding them comes (the model's forward builds their masks), even with
        examples kept at other depths in it. Fewer: the kept states are past the new prefix, so they are dropped.

        Raises:
            ValueError: `num_frozen_blocks` is not an integer from 0 to the number of blocks.
        """
        n = len(self.blocks)
        if isinstance(num_frozen_blocks, bool) or not isinstance(num_frozen_blocks, int):
            raise ValueError(f"`num_frozen_blocks` must be an integer from 0 to {n}, got {num_frozen_blocks!r}.")
        if not 0 <= num_frozen_blocks <= n:
            raise ValueError(
                f"`num_frozen_blocks`={num_frozen_blocks} but {type(self.model).__name__} has {n} blocks "
                f"(in `{self.stack.name}`). Allowed: 0 to {n}."
            )
        if num_frozen_blocks < self._k:
            self.clear()
        self._k = num_frozen_blocks

    def _prefix_modules(self) -> list[tuple[str, nn.Module]]:
        blocks = [(f"{self.stack.name}.{i}", self.blocks[i]) for i in range(self._k)]
        return self._embeddings + self._shared + blocks

    def live_dropouts(self) -> list[str]:
        """The dropouts beside the stack that the frozen blocks also use and that hold no parameter (GPT-2's
        `drop`, after its embeddings), with a nonzero probability: `frozen_eval_mode` leaves them training, so no
        micro-batch can be served while they are."""
        return [
            name
            for name, module in self._shared
            if isinstance(module, nn.Dropout) and module.p > 0 and not any(True for _ in module.parameters())
        ]

    def _prefix_reason(self) -> str | None:
        """Why the prefix's output is not a fixed function of the batch now, or None."""
        shared = {id(module) for _, module in self._shared}
        for name, module in self._prefix_modules():
            also = " (the frozen blocks use it too)" if id(module) in shared else ""
            for sub_name, sub in module.named_modules(prefix=name):
                if sub.training and getattr(sub, "neftune_noise_alpha", None):
                    return f"NEFTune adds noise to the output of `{sub_name}` (`neftune_noise_alpha`)"
                if sub.training and not _inert_in_training(sub):
                    return f"`{sub_name}` ({type(sub).__name__}) is in train mode{also}"
            for param_name, param in module.named_parameters(prefix=name):
                if param.requires_grad:
                    return f"`{param_name}` is trainable{also}"
        return None

    def _check_unchanged(self) -> None:
        """Drop the kept states if a frozen weight changed since they were computed (e.g. loaded in place).

        Parameters only: the prefix's buffers are constants (position ids, all-zero token types) that a trainer
        may write again, unchanged, at every `train()`."""
        changed = False
        for _, module in self._prefix_modules():
            for tensor in module.parameters():
                now = (tensor._version, tensor.data_ptr())
                if self._versions.setdefault(id(tensor), now) != now:
                    changed = True
                    self._versions[id(tensor)] = now
        context = self._autocast_context()
        if self._context != context:
            changed = changed or self._context is not None
            self._context = context
        if changed:
            self.clear()

    def _model_device(self) -> torch.device:
        return next(self._embeddings[0][1].parameters()).device

    def _autocast_context(self) -> tuple:
        device_type = self._model_device().type
        enabled = torch.is_autocast_enabled(device_type)
        return device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None

    # --- the micro-batch ----------------------------------------------------------------------------------------

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"Frozen-activation cache: {reason}, so micro-batches are computed without the cache while it lasts.",
                stacklevel=4,
            )

    def _input_reason(self, inputs: Mapping[str, Any]) -> str | None:
        config = getattr(self.model, "config", None)
        for flag in OUTPUT_FLAGS:
            if inputs.get(flag) or getattr(config, flag, False):
                return f"`{flag}` asks for the skipped blocks' outputs"
        others = sorted({k for k, v in inputs.items() if v is not None} - PREFIX_INPUTS - INERT_INPUTS)
        if others:
            listed = ", ".join(f"`{k}`" for k in others)
            return f"the batch holds {listed}, which the cache does not know to leave the frozen prefix unchanged"
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return "the batch has no 2-D `input_ids`"
        for name in ("attention_mask", "token_type_ids"):
            value = inputs.get(name)
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != ids.shape):
                return f"`{name}` is not shaped like `input_ids`"
        positions = inputs.get("position_ids")
        if positions is not None and (
            not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != ids.shape[1]
        ):
            return "`position_ids` is not a (batch or 1, length) tensor"
        return None

    def _keys(self, inputs: Mapping[str, Any]) -> tuple[list[tuple], torch.Tensor | None]:
        """One key per example (what the frozen prefix reads of it) and the padding mask (None: no padding)."""
        ids = inputs["input_ids"]
        batch, length = ids.shape
        ids_cpu = ids.detach().to("cpu", torch.int64)
        mask = inputs.get("attention_mask")
        mask_cpu = None if mask is None else mask.detach().to("cpu") != 0
        if mask_cpu is not None and bool(mask_cpu.all()):
            mask_cpu = None
        types = inputs.get("token_type_ids")
        types_np = None if types is None else types.detach().to("cpu", torch.int64).numpy()
        positions = inputs.get("position_ids")
        if positions is not None:
            positions = positions.detach().to("cpu", torch.int64).expand(batch, length)
        elif self.architecture.positions_from_ids:
            kept = ids_cpu.ne(self._padding_idx).long()
            positions = torch.cumsum(kept, dim=1) * kept + self._padding_idx
        positions_np = None if positions is None else positions.numpy()
        ids_np = ids_cpu.numpy()
        lengths = [length] * batch if mask_cpu is None else mask_cpu.sum(1).tolist()
        right_padded = mask_cpu is None or bool(
            (mask_cpu == (torch.arange(length) < mask_cpu.sum(1, keepdim=True))).all()
        )
        keys = []
        for row in range(batch):
            if right_padded:
                where: Any = slice(0, lengths[row])
                layout: Any = lengths[row]
            else:
                where = mask_cpu[row].nonzero().flatten().numpy()
                layout = where.astype("int64").tobytes()
            keys.append(
                (
                    layout,
                    ids_np[row, where].tobytes(),
                    b"" if types_np is None else types_np[row, where].tobytes(),
                    b"" if positions_np is None else positions_np[row, where].tobytes(),
                )
            )
        device_mask = None if mask_cpu is None else mask_cpu.to(self._model_device())
        return keys, device_mask

    def _padding_reason(self, inputs: Mapping[str, Any], labels: Any, mask: torch.Tensor | None) -> str | None:
        """Why the loss could read a padded position (whose output the cache does not reproduce), or None.

        Token labels must be -100 at and next to padded positions; a sequence head reads position 0 (an encoder's
        first token) or the last token (a decoder's: the last one that is not `pad_token_id`, or the last position
        when that is not set), which must not be padding; no row may be all padding."""
        if mask is None:
            return None
        padded = ~mask
        if not bool(mask.any(1).all()):
            return "a row is all padding (the head would read a padded position)"
        if isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
            read = labels.to(mask.device) != -100
            # a causal LM predicts the label at t + 1 from position t
            read_shifted = torch.zeros_like(read)
            read_shifted[:, :-1] = read[:, 1:]
            if bool(((read | read_shifted) & padded).any()):
                return "token labels at or next to padded positions are not -100 (the loss would read padding)"
        elif not self.architecture.pads_with_pad_id and not bool(mask[:, 0].all()):
            return "a row's first position is padding (left padding), and the head reads the first position"
        pad_id = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if self.architecture.pads_with_pad_id and pad_id is None and not bool(mask[:, -1].all()):
            return "`pad_token_id` is not set, so the head reads the last position, which is padding in a row"
        if self.architecture.pads_with_pad_id and pad_id is not None:
            if bool((inputs["input_ids"].to(padded.device)[padded] != pad_id).any()):
                return "a masked position holds a token other than `pad_token_id` (the head would read it)"
        return None

    def _plan(self, inputs: Mapping[str, Any], labels: Any) -> _Plan | None:
        """What to do with the micro-batch the model is called with (`inputs`: its forward's keyword arguments;
        `labels`: those the loss reads)."""
        if self._k == 0:
            return None
        reason = self._input_reason(inputs) or self._prefix_reason()
        if reason is None:
            keys, mask = self._keys(inputs)
            reason = self._padding_reason(inputs, labels, mask)
        if reason is not None:
            self._warn_once(reason)
            return None
        self._check_unchanged()
        plan = _Plan(keys=keys, shape=tuple(inputs["input_ids"].shape), mask=mask)
        entries = [self._entries.get(key) for key in keys]
        if all(entry is not None for entry in entries):
            depths = sorted({entry.depth for entry in entries})
            plan.depth = depths[0]
            for depth in depths:
                rows = [entry.depth == depth for entry in entries]
                states = self._padded([entry.states if entry.depth == depth else None for entry in entries], plan)
                if depth == plan.depth:
                    plan.states = states
                else:
                    plan.deeper[depth] = (torch.tensor(rows, device=states.device), states)
        if plan.depth < self._k:
            plan.keep_rows = [row for row, entry in enumerate(entries) if entry is None or entry.depth < self._k]
        return plan

    def _padded(self, states: list[torch.Tensor | None], plan: _Plan) -> torch.Tensor:
        """The kept states of the rows that have them, padded again to the batch's shape on the model's device
        (zeros at padded positions and in the other rows)."""
        batch, length = plan.shape
        rows = [row for row, kept in enumerate(states) if kept is not None]
        flat = torch.cat([states[row] for row in rows]).to(self._model_device())
        if plan.mask is None and len(rows) == batch:
            return flat.view(batch, length, -1)
        padded = flat.new_zeros(batch, length, flat.shape[-1])
        where = torch.zeros(batch, length, dtype=torch.bool, device=flat.device)
        where[rows] = True
        padded[where if plan.mask is None else where & plan.mask] = flat
        return padded

    @contextlib.contextmanager
    def serving(self, inputs: Mapping[str, Any]) -> Iterator[None]:
        """Serve one training micro-batch (its forward and backward inside) from the cache where it can.

        `inputs` is the trainer's batch; the examples are recognised by what the model's forward is called with
        (a `compute_loss` may change the batch), and the labels are those of the call, or else those `inputs` held
        on entry (a label smoother takes them out before the call). The decision is taken when the model's forward
        starts (so after a trainer has put the frozen modules in eval mode): when the prefix is frozen and in eval
        mode and every example is kept, the embeddings and blocks 0..K-1 are not called; otherwise the micro-batch
        is computed normally and its examples' states at block K are kept (within the budget). A condition that
        prevents serving (a trainable or train-mode module in the prefix, an input the cache does not know, a head
        or labels that read padded positions, an inner call asking for every block's output) is said once per
        kind, as a warning. A second forward inside the same `serving` is computed normally.
        """
        labels = inputs.get("labels")
        with contextlib.ExitStack() as undo:
            calls = []

            def start(module, args, kwargs):
                calls.append(None)
                if len(calls) > 1:  # not the micro-batch the plan is for
                    undo.close()
                    return
                ids = kwargs.get("input_ids")
                batch = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() > 0 else 0
                self._seen += batch
                if args:
                    self._warn_once("the model is called with positional arguments, which the cache does not read")
                    return
                plan = self._plan(kwargs, kwargs.get("labels", labels))
                if plan is None:
                    return
                if plan.depth:
                    self._hits += batch
                    self._stand_in(plan, undo)
                    self._watch_inner_calls(batch, undo)
                if plan.keep_rows:
                    self._capture(plan, undo)

            handle = self.model.register_forward_pre_hook(start, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

    def _watch_inner_calls(self, batch: int, undo: contextlib.ExitStack) -> None:
        """Compute normally after all if the base model (the module holding the embeddings and the stack), or a
        module between it and the model, is called asking for every block's output (a head of the user's that
        combines several layers): the stand-ins' outputs are not those. Calls inside the base model are the
        architecture's own (DeBERTa's encoder always returns every layer; the model passes on only the last)."""
        path = self.stack.name.split(".")
        for name, _ in self._embeddings:
            shared = 0
            for a, b in zip(path, name.split("."), strict=False):
                if a != b:
                    break
                shared += 1
            path = path[:shared]
        inner = [self.model.get_submodule(".".join(path[: i + 1])) for i in range(len(path))]

        def check(module, args, kwargs):
            asked = next((flag for flag in OUTPUT_FLAGS if kwargs.get(flag)), None)
            if asked is not None:
                self._hits -= batch
                undo.close()  # the modules back in place, no state fed
                self._warn_once(f"`{type(module).__name__}` is called with `{asked}`, asking for every block's output")

        for module in inner:
            undo.callback(module.register_forward_pre_hook(check, with_kwargs=True).remove)

    def _swap(self, parent: nn.Module, attribute: str, stand_in: nn.Module, undo: contextlib.ExitStack) -> None:
        original = parent._modules[attribute]
        setattr(parent, attribute, stand_in)
        undo.callback(setattr, parent, attribute, original)

    def _stand_in(self, plan: _Plan, undo: contextlib.ExitStack) -> None:
        """Put stand-ins in place of the embeddings and blocks 0..depth-1, and feed the states into block depth."""
        states = plan.states
        batch, length = plan.shape
        for parent, attribute, module in self._embedding_slots:
            weight = next(module.parameters())
            zeros = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(batch, length, states.shape[-1])
            self._swap(parent, attribute, _StandIn(module, lambda args, kwargs, z=zeros: z), undo)
        for attribute, index in self._skipped_shared:
            module = getattr(self._stack_parent, attribute)
            self._swap(self._stack_parent, attribute, _StandIn(module, lambda args, kwargs, i=index: args[i]), undo)
        kind = self.architecture.output
        last = len(self.blocks) - 1
        for i in range(plan.depth):
            if i == last:  # every block is skipped: the last returns the states
                output = lambda args, kwargs: _block_output(kind, states)  # noqa: E731
            else:
                output = lambda args, kwargs: _block_output(kind, _first_argument(args, kwargs))  # noqa: E731
            self._swap(self.blocks, str(i), _StandIn(self.blocks[i], output), undo)
        needs_grad = self._states_require_grad and torch.is_grad_enabled()
        if plan.depth <= last:
            states.requires_grad_(needs_grad)
            undo.callback(self.blocks[plan.depth].register_forward_pre_hook(_feed(states), with_kwargs=True).remove)
        for depth, (rows, deeper) in plan.deeper.items():
            deeper.requires_grad_(needs_grad)
            if depth <= last:
                handle = self.blocks[depth].register_forward_pre_hook(_feed(deeper, rows), with_kwargs=True)
            else:  # kept as the last block's output
                handle = self.blocks[last].register_forward_hook(_put_rows_in_output(rows, deeper))
            undo.callback(handle.remove)

    def _capture(self, plan: _Plan, undo: contextlib.ExitStack) -> None:
        """Keep the states reaching block K of the rows `plan.keep_rows` (the output of the last block if K = n)."""
        if self._k < len(self.blocks):

            def hook(module, args, kwargs):
                self._keep(plan, _first_argument(args, kwargs))

            handle = self.blocks[self._k].register_forward_pre_hook(hook, with_kwargs=True)
        else:

            def hook(module, args, output):
                self._keep(plan, _hidden_of(output))

            handle = self.blocks[self._k - 1].register_forward_hook(hook)
        undo.callback(handle.remove)

    def _keep(self, plan: _Plan, hidden: torch.Tensor) -> None:
        rows, plan.keep_rows = plan.keep_rows, None  # once (a checkpointed block runs again in backward)
        if not rows:
            return
        if hidden.requires_grad:
            feeding = _trainable_in(hidden, self.model)
            if feeding:
                listed = ", ".join(f"`{name}`" for name in feeding[:3])
                self._warn_once(
                    f"the states reaching block {self._k} depend on trainable {listed}: freeze it to cache"
                )
                return
        # Without a trainable parameter behind them they may still require a gradient (an input embeddings hook,
        # as `activation_checkpointing_enable` sets): the fed states do the same, so checkpointing sees the same.
        self._states_require_grad = hidden.requires_grad
        width = hidden.shape[-1]
        lengths = [plan.shape[1]] * plan.shape[0] if plan.mask is None else plan.mask.sum(1).tolist()
        item = hidden.element_size() * width
        chosen, new_keys = [], set()
        for row in rows:
            key = plan.keys[row]
            if key not in new_keys and self._admit(key, lengths[row] * item):
                chosen.append(row)
                new_keys.add(key)
        if not chosen:
            return
        taken, mask = hidden.detach(), plan.mask
        if len(chosen) < plan.shape[0]:
            index = torch.tensor(chosen, device=hidden.device)
            taken, mask = taken.index_select(0, index), None if mask is None else mask.index_select(0, index)
        flat = taken.reshape(-1, width) if mask is None else taken[mask]  # a copy, but for a whole unpadded batch
        flat = flat.to(self.device, copy=mask is None and len(chosen) == plan.shape[0])
        for row, states in zip(chosen, flat.split([lengths[row] for row in chosen]), strict=True):
            self._entries[plan.keys[row]] = entry = _Entry(self._k, states)
            if self._new is not None:
                self._new.append((plan.keys[row], entry))

    def _admit(self, key: tuple, nbytes: int) -> bool:
        """Count `nbytes` of states for `key` (replacing what it held) if the budget allows; else say so, once."""
        old = self._entries.get(key)
        cost = nbytes + (0 if old is not None else _key_bytes(key))
        freed = 0 if old is None else _nbytes(old.states)
        if self._bytes + cost - freed > self.budget_bytes:
            self._budget_reached()
            return False
        self._bytes += cost - freed
        return True

    # --- several processes --------------------------------------------------------------------------------------

    def share_across_processes(self) -> None:
        """From now on, `share_new_entries` sends what this process keeps to the other processes."""
        if self._new is None:
            self._new = []

    @property
    def shares(self) -> bool:
        """Whether `share_across_processes` was called."""
        return self._new is not None

    def share_new_entries(self) -> None:
        """Send the examples this process kept since the last call to every other process of the default group,
        and keep theirs (within the budget): each process can then serve any example that one of them computed.

        A collective: every process calls it at the same point (the component calls it after each optimizer
        step). The states travel through the CPU, pickled (`all_gather_object`).
        """
        new, self._new = self._new or [], []
        outgoing = [(key, entry.depth, entry.states.cpu()) for key, entry in new]
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, outgoing)
        me = torch.distributed.get_rank()
        for rank, entries in enumerate(gathered):
            for key, depth, states in entries if rank != me else ():
                if 0 < depth <= self._k and key not in self._entries and self._admit(key, _nbytes(states)):
                    self._entries[key] = _Entry(depth, states.to(self.device))

    def _budget_reached(self) -> None:
        if not self.budget_exceeded_warned:
            self.budget_exceeded_warned = True
            warnings.warn(
                f"Frozen-activation cache: its budget of {self.budget_bytes / GB:g} GB is reached with "
                f"{len(self._entries)} examples kept; the others are computed as without the cache (raise "
                "`frozen_activation_cache_gb` to keep more).",
                stacklevel=2,
            )

    # --- reports ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes of the kept states and their keys."""
        return self._bytes

    def clear(self) -> None:
        """Drop every kept state (the budget warning stays said)."""
        self._entries.clear()
        self._bytes = 0
        if self._new is not None:
            self._new = []  # nothing computed before is sent on

    def stats(self) -> dict[str, float]:
        """`activation_cache_hit_rate` (examples served / examples seen since the last call; 0.0 when none) and
        `activation_cache_gb` (the cache's size now), for the logs. Resets the counts."""
        rate = self._hits / self._seen if self._seen else 0.0
        self._hits = self._seen = 0
        return {"activation_cache_hit_rate": rate, "activation_cache_gb": self._bytes / GB}


def _feed(states: torch.Tensor, rows: torch.Tensor | None = None):
    """A block's pre-hook that feeds it `states` (only in `rows`, a bool (batch,) tensor, when given)."""

    def hook(module, args, kwargs):
        hidden = states
        if rows is not None:
            hidden = _first_argument(args, kwargs)
            hidden = torch.where(rows[:, None, None], states.to(hidden.dtype), hidden)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def _put_rows_in_output(rows: torch.Tensor, states: torch.Tensor):
    """The last block's forward hook that replaces the output of `rows` by `states`."""

    def hook(module, args, output):
        hidden = _hidden_of(output)
        hidden = torch.where(rows[:, None, None], states.to(hidden.dtype), hidden)
        return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden

    return hook


def _inert_in_training(module: nn.Module) -> bool:
    """A module whose train mode changes nothing: dropout with p = 0, or one with no behaviour of its own."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p == 0
    return isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Embedding, nn.Linear, nn.LayerNorm))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _key_bytes(key: tuple) -> int:
    return sum(len(part) if isinstance(part, bytes) else 8 for part in key)


def _trainable_in(tensor: torch.Tensor, model: nn.Module) -> list[str]:
    """The names of the trainable parameters of `model` that a tensor's autograd graph reaches, sorted."""
    names = {id(p): name for name, p in model.named_parameters()}
    found, seen, todo = [], set(), [tensor.grad_fn]
    while todo and len(seen) < 100_000:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in names:
            found.append(names[id(variable)])
        todo.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found)


def _check_deberta(model: nn.Module, num_blocks: int) -> None:
    if getattr(getattr(model, "base_model", model), "z_steps", 0) > 1:
        raise ValueError(
            "The frozen-activation cache does not support DeBERTa-v2 with `z_steps` > 1: it reruns the last block "
            "on the skipped blocks' outputs. Train without `cache_frozen_activations`."
        )
    if num_blocks == 1 and getattr(model.config, "conv_kernel_size", 0) > 0:
        raise ValueError(
            "The frozen-activation cache does not support a one-layer DeBERTa-v2 with `conv_kernel_size` > 0: its "
            "convolution follows the only block. Train without `cache_frozen_activations`."
        )


def frozen_prefix(model: nn.Module) -> int:
    """K: the leading blocks of the layer stack frozen now, counted only when the input embeddings are frozen too
    (the prefix the cache can serve); 0 otherwise."""
    embeddings = [p for _, module in find_input_embeddings(model) for p in module.parameters()]
    if not embeddings or any(p.requires_grad for p in embeddings):
        return 0
    k = 0
    for block in find_layer_stack(model).blocks:
        params = list(block.parameters())
        if not params or any(p.requires_grad for p in params):
            break
        k += 1
    return k


def check_activation_cache(model: nn.Module, settings) -> None:
    """Refuse `cache_frozen_activations` for an architecture the cache does not know, naming it (at construction,
    before anything is written)."""
    if settings.cache_frozen_activations:
        FrozenActivationCache.from_model(model, 0, settings.frozen_activation_cache_gb * GB)


class CacheFrozenActivations(TrainerComponent):
    """`cache_frozen_activations`: each training micro-batch runs inside the cache's `serving`, its prefix the
    frozen blocks at that micro-batch (automatic freezing grows it); `activation_cache_hit_rate` (per logging
    window) and `activation_cache_gb` are logged. Under several processes, what each keeps is shared with the
    others after every optimizer step, so each can serve every example from the second epoch on."""

    def __init__(self, budget_bytes: float, prefix_grows: bool = False):
        self.budget_bytes, self.prefix_grows = budget_bytes, prefix_grows
        self.cache: FrozenActivationCache | None = None

    @classmethod
    def from_args(cls, settings, model) -> CacheFrozenActivations | None:
        if not settings.cache_frozen_activations:
            return None
        return cls(settings.frozen_activation_cache_gb * GB, prefix_grows=settings.auto_freeze)

    def on_train_begin(self, trainer) -> None:
        k = frozen_prefix(trainer.model)
        tied = heads_tied_to_trainable_embeddings(trainer.model) if k == 0 and self.prefix_grows else []
        nothing_to_serve = k == 0 and (not self.prefix_grows or bool(tied))
        if nothing_to_serve:
            how = (
                f"automatic freezing leaves them trainable, as they are the output head's {', '.join(tied)} too "
                "(tied): untie them (`tie_word_embeddings=False`) or set `freeze_embeddings`"
                if tied
                else "set `freeze_embeddings` and `freeze_first_n_layers`, or `auto_freeze`"
            )
            warnings.warn(
                "`cache_frozen_activations`=True, but the model's input embeddings and first block are not both "
                f"frozen, so the cache has nothing to serve until they are: {how}.",
                stacklevel=2,
            )
        self.cache = FrozenActivationCache.from_model(trainer.model, k, self.budget_bytes)
        for name in self.cache.live_dropouts() if not nothing_to_serve else ():
            warnings.warn(
                f"`cache_frozen_activations`=True cannot serve any micro-batch of {type(trainer.model).__name__}: "
                f"its dropout `{name}` (p={self.cache.model.get_submodule(name).p}) acts on the frozen "
                "embeddings' output but holds no parameter, so `frozen_eval_mode` leaves it training. Build the "
                "model with that dropout at 0 (GPT-2: `embd_pdrop=0.0`), or call `.eval()` on it after each "
                "`model.train()`.",
                stacklevel=2,
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.args.world_size > 1:
            self.cache.share_across_processes()

    def on_step_end(self, trainer) -> None:
        if self.cache is not None and self.cache.shares:
            self.cache.share_new_entries()

    def micro_batch(self, trainer, inputs: dict):
        if self.cache is None:
            return contextlib.nullcontext()
        k = frozen_prefix(trainer.model)  # whoever froze more (automatic freezing, a callback, a resume)
        if k != self.cache.num_frozen_blocks:
            self.cache.set_prefix(k)
        return self.cache.serving(inputs)

    def log_entries(self, trainer) -> dict[str, float]:
        return self.cache.stats() if self.cache is not None else {}
