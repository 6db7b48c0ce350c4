"""Freezing functions on every covered architecture: bare, under a task head, wrapped by PEFT."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from hf_gradtools import (
    GradTrainer,
    LayerStackNotFoundError,
    find_layer_stack,
    freeze,
    freeze_embeddings,
    freeze_first_n_layers,
    get_frozen_parameters,
    unfreeze,
)
from tests.conftest import ARCHS, classification_data, eos_of, tiny_classifier, tiny_config

# What freeze_embeddings + freeze_first_n_layers(2) must freeze under a sequence-classification head, written
# out by hand per architecture: (embedding prefixes, layer-stack prefix, base-model prefix).
EXPECTED = {
    "bert": (["bert.embeddings."], "bert.encoder.layer.", "bert."),
    "roberta": (["roberta.embeddings."], "roberta.encoder.layer.", "roberta."),
    "deberta-v2": (["deberta.embeddings."], "deberta.encoder.layer.", "deberta."),
    "distilbert": (["distilbert.embeddings."], "distilbert.transformer.layer.", "distilbert."),
    "electra": (["electra.embeddings.", "electra.embeddings_project."], "electra.encoder.layer.", "electra."),
    "albert": (["albert.embeddings."], "albert.encoder.albert_layer_groups.", "albert."),
    "gpt2": (["transformer.wte.", "transformer.wpe."], "transformer.h.", "transformer."),
    "llama": (["model.embed_tokens."], "model.layers.", "model."),
    "modernbert": (["model.embeddings."], "model.layers.", "model."),
    "t5": (["transformer.shared."], "transformer.encoder.block.", "transformer."),
    "bart": (
        [
            "model.shared.",
            "model.encoder.embed_positions.",
            "model.encoder.layernorm_embedding.",
            "model.decoder.embed_positions.",
            "model.decoder.layernorm_embedding.",
        ],
        "model.encoder.layers.",
        "model.",
    ),
}


LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "modernbert": ["Wqkv"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


def expected_frozen(model, embedding_prefixes, stack_prefix, arch):
    # ALBERT's 3 layers run one shared block (group 0): freezing 2 layers freezes that block.
    blocks = ["0."] if arch == "albert" else ["0.", "1."]
    prefixes = list(embedding_prefixes) + [stack_prefix + b for b in blocks]
    # T5's relative attention bias sits in block 0 but serves every layer: it stays trainable.
    shared = "relative_attention_bias"
    return [n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes) and shared not in n]


def freeze_both(model):
    albert = getattr(model.config, "model_type", "") == "albert"
    with pytest.warns(UserWarning, match="shares 1 block") if albert else _null():
        return freeze_embeddings(model) + freeze_first_n_layers(model, 2)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("arch", ARCHS)
def test_task_head_freezes_expected_names(arch):
    model = tiny_classifier(arch)
    embeddings, stack, _ = EXPECTED[arch]
    expected = expected_frozen(model, embeddings, stack, arch)
    frozen = freeze_both(model)
    assert sorted(frozen) == sorted(expected)
    assert get_frozen_parameters(model) == expected  # model order
    assert find_layer_stack(model).num_layers == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_bare_model_freezes_expected_names(arch):
    torch.manual_seed(0)
    model = T.AutoModel.from_config(tiny_config(arch))
    embeddings, stack, base = EXPECTED[arch]
    strip = lambda p: p[len(base) :]  # noqa: E731
    expected = expected_frozen(model, [strip(p) for p in embeddings], strip(stack), arch)
    assert expected, "the expectation must name parameters"
    assert get_frozen_parameters(model) == []
    freeze_both(model)
    assert get_frozen_parameters(model) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_wrapped_model(arch):
    peft = pytest.importorskip("peft")
    model = tiny_classifier(arch)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=LORA_TARGETS[arch])
    model = peft.get_peft_model(model, config)
    embeddings, stack, _ = EXPECTED[arch]
    prefix = "base_model.model."
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = freeze_both(model)
    scope = expected_frozen(model, [prefix + p for p in embeddings], prefix + stack, arch)
    # Only what was trainable in the scope is newly frozen: the LoRA matrices of blocks 0 and 1.
    assert sorted(frozen) == sorted(n for n in scope if n in trainable_before)
    assert frozen and all("lora_" in n for n in frozen)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in scope)
    if arch != "albert":  # ALBERT's only block is frozen
        assert any(
            n.startswith(prefix + stack + "2.") and "lora_" in n and p.requires_grad
            for n, p in model.named_parameters()
        )


def test_deberta_v3_classic_case():
    model = tiny_classifier("deberta-v2")
    freeze_embeddings(model)
    freeze_first_n_layers(model, 2)
    frozen = get_frozen_parameters(model)
    assert frozen == [
        "deberta.embeddings.word_embeddings.weight",
        "deberta.embeddings.LayerNorm.weight",
        "deberta.embeddings.LayerNorm.bias",
        *[
            n
            for n, _ in model.named_parameters()
            if n.startswith(("deberta.encoder.layer.0.", "deberta.encoder.layer.1."))
        ],
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {
        "deberta.encoder.rel_embeddings.weight",
        "deberta.encoder.LayerNorm.weight",
        "deberta.encoder.LayerNorm.bias",
    } <= trainable
    assert any(n.startswith("deberta.encoder.layer.2.") for n in trainable)


def test_gpt2_tied_head_is_frozen_with_embeddings():
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(tiny_config("gpt2"))
    freeze_embeddings(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.lm_head.weight.requires_grad


def test_freeze_unfreeze_return_changed_names():
    model = tiny_classifier("bert")
    layers = model.bert.encoder.layer
    names = freeze(layers[:2])
    assert names == [n for n, _ in layers[:2].named_parameters()]
    assert names[0] == "0.attention.self.query.weight"
    assert freeze(layers[:2]) == []  # nothing left to change
    assert freeze([model.classifier, model.bert.pooler]) == ["0.weight", "0.bias", "1.dense.weight", "1.dense.bias"]
    assert unfreeze(model.classifier) == ["weight", "bias"]
    assert freeze(model.classifier.weight) == ["weight"]
    assert get_frozen_parameters(model.classifier) == ["weight"]
    assert freeze_first_n_layers(model, 0) == []


def test_too_many_layers_names_the_count():
    model = tiny_classifier("bert")
    with pytest.raises(ValueError, match=r"`freeze_first_n_layers`=4 .* only 3 layers .*bert\.encoder\.layer"):
        freeze_first_n_layers(model, 4)
    with pytest.raises(ValueError, match="non-negative integer, got -1"):
        freeze_first_n_layers(model, -1)
    assert get_frozen_parameters(model) == []


def test_unknown_architecture_error_names_class():
    class TwoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    with pytest.raises(LayerStackNotFoundError, match=r"TwoLinear.*freeze\(model"):
        freeze_first_n_layers(TwoLinear(), 1)
    with pytest.raises(ValueError, match="TwoLinear has no input embeddings"):
        freeze_embeddings(TwoLinear())


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_trainable(arch, args_factory):
    model = tiny_classifier(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = args_factory(freeze_embeddings=True, freeze_first_n_layers=2, max_steps=2, learning_rate=5e-2)
    with pytest.warns(UserWarning) if arch == "albert" else _null():
        trainer = GradTrainer(model=model, args=args, train_dataset=classification_data(8, eos=eos_of(arch)))
    trainer.train()
    frozen = set(get_frozen_parameters(model))
    assert frozen
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(param, before[name]), f"trainable {name} did not change"
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("given", ["classifier", 3, None])
def test_freeze_refuses_what_is_not_a_module_or_parameter(given):
    from hf_gradtools import freeze, unfreeze

    for function in (freeze, unfreeze):
        with pytest.raises(TypeError, match=r"take a module, a parameter, or an iterable of them.*get_submodule"):
            function(given)
