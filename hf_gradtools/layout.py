"""Find the input embeddings and the transformer layer stack of a model from its structure.

No per-model table: the layer stack is the largest `nn.ModuleList` of identical blocks (searched in the encoder
for encoder-decoder models), and the embedding block is the `*Embeddings` module that holds the input word
embedding, or, where the architecture has none (GPT-2, Llama, T5, BART), the embedding modules outside the
layer stacks; a vision model without `get_input_embeddings()` (ConvNeXt) has its `*Embeddings` module that cuts
the image into patches. A structure it does not understand is refused, never guessed: blocks split over several
lists (Funnel's `encoder.blocks`, a list of lists), or a decoder's stack after an encoder's in a model that is not
an encoder-decoder. Works through task heads and PEFT wrappers because it only walks `named_modules()`.
`head_parameter_names` finds the task head (what AGC leaves unclipped by default).

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=2, intermediate_size=32, vocab_size=100))
    >>> stack = find_layer_stack(model)
    >>> stack.name, stack.num_layers
    ('bert.encoder.layer', 3)
    >>> [name for name, _ in find_input_embeddings(model)]
    ['bert.embeddings']
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .errors import LayerStackNotFoundError


@dataclass(frozen=True)
class LayerStack:
    """The main stack of transformer blocks of a model.

    Attributes:
        name: qualified module name of the `nn.ModuleList`, e.g. `"bert.encoder.layer"`.
        blocks: the `nn.ModuleList` itself.
        num_layers: how many layers the forward pass runs. Equal to `len(blocks)` except for ALBERT, whose
            `num_hidden_groups` blocks are shared by `config.num_hidden_layers` layers.
    """

    name: str
    blocks: nn.ModuleList
    num_layers: int

    @property
    def shares_blocks(self) -> bool:
        return self.num_layers != len(self.blocks)

    def block_index(self, layer: int) -> int:
        """Index in `blocks` of the block that layer `layer` (0-based) runs."""
        return int(layer / (self.num_layers / len(self.blocks)))

    def shared_parameters(self) -> set[int]:
        """Ids of parameters that only the first block holds although every layer uses them.

        T5 keeps its relative attention bias in block 0 (`has_relative_attention_bias`) and hands the bias it
        computes to every later block: a parameter name that block 0 has and no other block has is such a one.
        """
        if len(self.blocks) < 2:
            return set()
        others = {name for block in list(self.blocks)[1:] for name, _ in block.named_parameters()}
        return {id(p) for name, p in self.blocks[0].named_parameters() if name not in others}

    def blocks_of_first(self, n: int) -> list[int]:
        """Indices of the blocks that the first `n` layers run, in order, without repeats."""
        return sorted({self.block_index(i) for i in range(n)})

    def layer_meaning(self) -> str:
        """What one layer of the stack is, e.g. "one BertLayer (`bert.encoder.layer.<i>`)", or for a stack of
        stages "one ConvNextStage (`convnext.encoder.stages.<i>`) of 3, 3, 9, 3 ConvNextLayer blocks (`layers`)"."""
        text = f"one {type(self.blocks[0]).__name__} (`{self.name}.<i>`)"
        inner = [_inner_blocks(block) for block in self.blocks]
        if all(inner):
            counts = ", ".join(str(len(blocks)) for _, blocks in inner)
            text += f" of {counts} {type(inner[0][1][0]).__name__} blocks (`{inner[0][0]}`)"
        if self.shares_blocks:
            text += f", one of {len(self.blocks)} shared by its {self.num_layers} layers"
        return text


def module_names(model: nn.Module) -> dict[int, str]:
    """Map `id(module)` to its first qualified name in `model`."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    return names


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    block_type = type(module[0])
    if issubclass(block_type, (nn.ModuleList, nn.ModuleDict)):
        return False
    return all(type(block) is block_type for block in module) and any(True for _ in module.parameters())


def find_block_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every outermost `nn.ModuleList` of identical, parameterised blocks under `root`, in module order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in root.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if _is_block_list(module):
            found.append((name, module))
    return found


def _inner_blocks(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The first child of `block` that is a list of identical parameterised blocks (a stage's blocks), or None."""
    for name, child in block.named_children():
        items = list(child) if isinstance(child, (nn.ModuleList, nn.Sequential)) else []
        if items and all(type(item) is type(items[0]) for item in items) and any(True for _ in child.parameters()):
            return name, child
    return None


def _attribute(name: str) -> str:
    """`name` as Python code on `model`: `"funnel.encoder.blocks.0"` -> `model.funnel.encoder.blocks[0]`."""
    return "model" + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".") if part)


def _ancestors(name: str) -> list[str]:
    """Qualified names of the modules above `name`, nearest first, without the root."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _list_holding(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The nearest `nn.ModuleList` above block list `name`: a list of lists or of unlike blocks, or None."""
    return next((up for up in _ancestors(name) if isinstance(modules[up], nn.ModuleList)), None)


def _decoder_holding(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The outermost module above (or being) block list `name` named, or of a class named, like a decoder."""
    found = [
        up
        for up in [name] + _ancestors(name)
        if "decoder" in up.rpartition(".")[2].lower() or "Decoder" in type(modules[up]).__name__
    ]
    return found[-1] if found else None


def _listed(model: nn.Module, lists: list[tuple[str, nn.ModuleList]]) -> str:
    names = module_names(model)
    return ", ".join(f"`{names[id(blocks)]}` ({len(blocks)} {type(blocks[0]).__name__})" for _, blocks in lists)


def _refuse_unclear_stack(model: nn.Module, root: nn.Module, candidates: list, chosen: str) -> None:
    """Raise when the block lists found do not make one stack whose order is clear from the structure."""
    modules = dict(root.named_modules())
    names = module_names(model)
    split = [(name, _list_holding(name, modules)) for name, _ in candidates]
    split = [(name, holder) for name, holder in split if holder is not None]
    if split:
        first, holder = split[0]
        raise LayerStackNotFoundError(
            f"The layers of {type(model).__name__} are not one list of blocks: `{names[id(modules[holder])]}` "
            f"holds them in several lists or among other modules ({_listed(model, candidates)}), so which are "
            '"the first N layers" cannot be read from its structure. Freeze blocks by name instead, e.g. '
            f"`freeze({_attribute(names[id(modules[first])])}[:2])`."
        )
    decoder = _decoder_holding(chosen, modules)
    outside = [(name, blocks) for name, blocks in candidates if decoder and not name.startswith(decoder + ".")]
    if decoder is not None and outside:
        stacks = [item for item in candidates if item in outside or item[0] == chosen]
        raise LayerStackNotFoundError(
            f"{type(model).__name__} has layer stacks inside and outside its decoder ({_listed(model, stacks)}) "
            "but is not an encoder-decoder model (`config.is_encoder_decoder` with `get_encoder()`), so which "
            'holds "the first N layers" cannot be read from its structure. Freeze blocks by name instead, e.g. '
            f"`freeze({_attribute(names[id(outside[0][1])])}[:2])`."
        )


def _input_side_module(model: nn.Module, stack: nn.Module | None = None) -> str | None:
    """The name of a module a hint can point at to freeze a model's input side by hand: its first `*Embeddings`
    module, else the first parameterised child of its base model that is not (and does not hold) the layer stack."""
    base = model
    for _ in range(8):  # PEFT wrapper -> task model -> base model (`base_model` is the module itself at the end)
        inner = getattr(base, "base_model", None)
        if not isinstance(inner, nn.Module) or inner is base:
            break
        base = inner
    names = module_names(model)
    for _, module in base.named_modules():
        if type(module).__name__.endswith("Embeddings") and any(True for _ in module.parameters()):
            return names[id(module)]
    for _, child in base.named_children():
        holds_stack = stack is not None and any(m is stack for m in child.modules())
        if not holds_stack and any(True for _ in child.parameters()):
            return names[id(child)]
    return None


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "to_dict") else None


def _encoder(model: nn.Module) -> nn.Module | None:
    config = _config(model)
    if config is None or not getattr(config, "is_encoder_decoder", False):
        return None
    get_encoder = getattr(model, "get_encoder", None)
    return get_encoder() if callable(get_encoder) else None


def find_layer_stack(model: nn.Module) -> LayerStack:
    """Return the main transformer layer stack of `model`.

    For encoder-decoder models (T5, BART) this is the encoder's stack: "the first N layers" are the N blocks
    nearest the input. Raises `LayerStackNotFoundError` (a `ValueError`) when no stack can be found.
    """
    encoder = _encoder(model)
    search_root = encoder if encoder is not None else model
    candidates = find_block_lists(search_root)
    if not candidates:
        first = _input_side_module(model)
        example = f"`freeze({_attribute(first)})`" if first else "`freeze(model.<module>)`"
        raise LayerStackNotFoundError(
            f"Could not find the transformer layer stack of {type(model).__name__}: it has no nn.ModuleList of "
            f"repeated blocks. Freeze modules by name instead, e.g. {example}."
        )
    chosen, blocks = max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    _refuse_unclear_stack(model, search_root, candidates, chosen)
    name = module_names(model)[id(blocks)]
    num_layers = len(blocks)
    config = _config(model)
    # ALBERT runs `num_hidden_layers` layers through `num_hidden_groups` shared blocks.
    groups = getattr(config, "num_hidden_groups", None)
    if groups == len(blocks) and getattr(config, "num_hidden_layers", num_layers) > num_layers:
        num_layers = config.num_hidden_layers
    return LayerStack(name=name, blocks=blocks, num_layers=num_layers)


def _parent_and_leaf(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def find_input_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return `(name, module)` for every module of the model's input embedding block, in module order.

    1. If the input word embedding sits inside a module whose class name ends in `Embeddings` (BERT, RoBERTa,
       DeBERTa, DistilBERT, ELECTRA, ALBERT, ModernBERT; ViT, Swin, DeiT, whose `get_input_embeddings()` is the
       patch embedding), that whole module (word, position and token-type embeddings and their LayerNorm), plus
       sibling modules named `*embed*` (ELECTRA's `embeddings_project`).
    2. Otherwise (GPT-2, Llama, T5, BART) every `nn.Embedding` outside the layer stacks and every module named
       `*embed*` beside one (BART's `layernorm_embedding`), encoder and decoder alike; output heads excluded.
    3. Without `get_input_embeddings()` (ConvNeXt): the first `*Embeddings` module outside the layer stacks that
       holds a patch embedding (a child named `*patch*`). A convolution stem without patches (ResNet's
       `embedder`) is not taken: the error names it, to freeze by hand.

    Raises:
        LayerStackNotFoundError: none of these is found; the message names a module to freeze by hand instead.
    """
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    why = "it has no `get_input_embeddings()`"
    try:
        word = get_input_embeddings() if callable(get_input_embeddings) else None
        if callable(get_input_embeddings) and word is None:
            why = "`get_input_embeddings()` returns None"
    except (NotImplementedError, AttributeError) as error:  # vision, audio and custom models without tokens
        word, why = None, f"`get_input_embeddings()` raises {type(error).__name__}"
    if word is None:
        patches = _patch_embeddings(model)
        if patches:
            return patches
        raise _no_embeddings(model, why + ", and it has no patch embedding outside its layer stack")
    names = module_names(model)
    modules = dict(model.named_modules())
    word_name = names[id(word)]

    prefix = word_name
    while prefix:
        prefix, _ = _parent_and_leaf(prefix)
        if type(modules[prefix]).__name__.endswith("Embeddings"):
            parent, _ = _parent_and_leaf(prefix)
            siblings = [
                name
                for name in modules
                if name != prefix and _parent_and_leaf(name)[0] == parent and "embed" in _parent_and_leaf(name)[1]
            ]
            return [(name, modules[name]) for name in modules if name == prefix or name in siblings]

    stacks = find_block_lists(model)
    output = getattr(model, "get_output_embeddings", lambda: None)()
    excluded = [name for name, _ in stacks] + ([names[id(output)]] if output is not None else [])

    def outside(name: str) -> bool:
        return not any(name == ex or name.startswith(ex + ".") for ex in excluded)

    embedding_parents = {
        _parent_and_leaf(name)[0] for name, module in modules.items() if isinstance(module, nn.Embedding)
    }
    picked = []
    for name, module in modules.items():
        if not name or not outside(name) or any(name.startswith(p + ".") for p, _ in picked):
            continue
        parent, leaf = _parent_and_leaf(name)
        if isinstance(module, nn.Embedding) or ("embed" in leaf.lower() and parent in embedding_parents):
            if any(True for _ in module.parameters()):
                picked.append((name, module))
    if not picked:
        raise _no_embeddings(model, f"`get_input_embeddings()` is `{word_name}`, inside a list of blocks")
    return picked


def _outside_stacks(model: nn.Module):
    """`(name, module)` of the model's modules that are not one of its block lists or inside one."""
    stacks = [name for name, _ in find_block_lists(model)]
    for name, module in model.named_modules():
        if name and not any(name == s or name.startswith(s + ".") for s in stacks):
            yield name, module


def _patch_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    for name, module in _outside_stacks(model):
        patches = any("patch" in child.lower() for child, _ in module.named_children())
        if type(module).__name__.endswith("Embeddings") and patches and any(True for _ in module.parameters()):
            return [(name, module)]
    return []


def _no_embeddings(model: nn.Module, why: str) -> LayerStackNotFoundError:
    try:
        stack = find_layer_stack(model).blocks
    except LayerStackNotFoundError:
        stack = None
    module = _input_side_module(model, stack)
    named = dict(model.named_modules())
    hint = f"`freeze({_attribute(module)})` ({type(named[module]).__name__})" if module else "`freeze(model.<module>)`"
    return LayerStackNotFoundError(
        f"{type(model).__name__} has no input embeddings ({why}), so `freeze_embeddings` cannot apply to it. "
        f"Freeze its input modules by name instead, e.g. {hint}."
    )


def model_layout(model: nn.Module) -> tuple[str | None, list[str]]:
    """The layer stack's module name (or `None`) and the embedding modules' names (or `[]`) of `model`."""
    try:
        stack = find_layer_stack(model).name
    except LayerStackNotFoundError:
        stack = None
    try:
        embeddings = [name for name, _ in find_input_embeddings(model)]
    except LayerStackNotFoundError:
        embeddings = []
    return stack, embeddings


# ---- the one partition of a model's parameters, and its labels (monitoring, LLRD, the spike guard) ----

EMBEDDINGS = "embeddings"
HEAD = "head"


def block_label(index: int) -> str:
    """The label of block `index` of the layer stack, e.g. `layer.3`."""
    return f"layer.{index}"


def parameter_group(name: str, layer_stack: str | None, embeddings: Iterable[str]) -> str:
    """The group of parameter `name` in the one partition of a model's parameters: `"embeddings"`, `"layer.<i>"`
    (block i of the layer stack) or `"head"` (everything else: the task head, pooler, final norms).

    Example:
        >>> parameter_group("bert.encoder.layer.3.attention.self.query.weight", "bert.encoder.layer", [])
        'layer.3'
    """
    if any(name.startswith(module + ".") for module in embeddings):
        return EMBEDDINGS
    if layer_stack:
        match = re.match(re.escape(layer_stack) + r"\.(\d+)\.", name)
        if match:
            return block_label(int(match.group(1)))
    return HEAD


def group_order(group: str) -> tuple[int, int]:
    """Sort key: embeddings, layer.0, layer.1, ..., head."""
    if group == EMBEDDINGS:
        return (0, 0)
    if group == HEAD:
        return (2, 0)
    return (1, int(group.split(".", 1)[1]))


# Module names that hold a task head, for models that are not a transformers task model.
HEAD_MODULE_NAMES = (
    "classifier",
    "classification_head",
    "pre_classifier",
    "score",
    "qa_outputs",
    "lm_head",
    "cls",
    "head",
    "fc",
)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or `model` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else None
    return inner if isinstance(inner, nn.Module) and inner is not model else model


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names (in `named_parameters()` order) of the parameters of the model's task head.

    Found from the structure: for a transformers task model (also inside PEFT), every parameter outside its base
    model (`model.base_model`: BERT's `classifier`, RoBERTa's whole `classifier` head, DistilBERT's
    `pre_classifier` and `classifier`, GPT-2's and Llama's `score`, BERT's `cls` MLM head), plus the output
    embeddings (`get_output_embeddings()`) unless they are tied to the input embeddings (a tied weight is the
    input embedding and is clipped as one). For other models: modules named like a head (`HEAD_MODULE_NAMES`)
    outside the layer stack and the embeddings (`model_layout`). A bare base model has no head.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=8, vocab_size=10))
        >>> head_parameter_names(model)
        ['classifier.weight', 'classifier.bias']
    """
    inner = _unwrap(model)
    base = getattr(inner, "base_model", None)
    if isinstance(base, nn.Module) and base is not inner:
        in_base = {id(p) for p in base.parameters()}
        head = {id(p) for p in inner.parameters() if id(p) not in in_base}
    else:
        stack, embeddings = model_layout(inner)
        skip = ([stack] if stack else []) + embeddings
        head = set()
        for module_name, module in inner.named_modules():
            if module_name.rpartition(".")[2] in HEAD_MODULE_NAMES and not _inside(module_name, skip):
                head |= {id(p) for p in module.parameters()}
    get_output = getattr(inner, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        get_input = getattr(inner, "get_input_embeddings", None)
        inputs = get_input() if callable(get_input) else None
        tied = {id(p) for p in inputs.parameters()} if isinstance(inputs, nn.Module) else set()
        head |= {id(p) for p in output.parameters() if id(p) not in tied}
    return [name for name, param in model.named_parameters() if id(param) in head]
