"""Find the input embeddings and the transformer layer stack of a model from its structure.

No per-model table: the layer stack is the largest `nn.ModuleList` of identical blocks (searched in the encoder
for encoder-decoder models), and the embedding block is the `*Embeddings` module that holds the input word
embedding, or, where the architecture has none (GPT-2, Llama, T5, BART), the embedding modules outside the
layer stacks. Works through task heads and PEFT wrappers because it only walks `named_modules()`.

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
        raise LayerStackNotFoundError(
            f"Could not find the transformer layer stack of {type(model).__name__}: it has no nn.ModuleList of "
            "repeated blocks. Freeze modules by name instead, e.g. `freeze(model.my_blocks[:2])`."
        )
    _, blocks = max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))
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
       DeBERTa, DistilBERT, ELECTRA, ALBERT, ModernBERT), that whole module (word, position and token-type
       embeddings and their LayerNorm), plus sibling modules named `*embed*` (ELECTRA's `embeddings_project`).
    2. Otherwise (GPT-2, Llama, T5, BART) every `nn.Embedding` outside the layer stacks and every module named
       `*embed*` beside one (BART's `layernorm_embedding`), encoder and decoder alike; output heads excluded.
    """
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        word = get_input_embeddings() if callable(get_input_embeddings) else None
    except (NotImplementedError, AttributeError):  # vision, audio and custom models without token embeddings
        word = None
    if word is None:
        raise LayerStackNotFoundError(
            f"{type(model).__name__} has no input embeddings (`get_input_embeddings()` gives none), so "
            "`freeze_embeddings` cannot apply to it. "
            "Freeze its embedding modules by name instead, e.g. `freeze(model.embed)`."
        )
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
    return picked


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
