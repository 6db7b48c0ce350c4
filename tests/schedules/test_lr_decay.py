"""Layer-wise learning-rate decay groups: exact rates per architecture, the weight-decay split, AdamW, schedulers."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from transformers import Trainer, get_linear_schedule_with_warmup

from hf_gradtools import freeze_embeddings, freeze_first_n_layers
from hf_gradtools.schedules import (
    GROUP_KEY,
    check_layerwise_lr_decay,
    layerwise_lr_groups,
    layerwise_lr_scales,
    param_groups_for,
)
from tests.conftest import tiny_classifier

pytestmark = pytest.mark.usefixtures("single_thread")

LR, DECAY, WD = 1e-3, 0.5, 0.01

# Written out by hand per architecture: the embedding prefix and the layer-stack prefix (3 blocks each).
LAYOUTS = {
    "bert": ("bert.embeddings.", "bert.encoder.layer."),
    "deberta-v2": ("deberta.embeddings.", "deberta.encoder.layer."),
    "llama": ("model.embed_tokens.", "model.layers."),
    "t5": ("transformer.shared.", "transformer.encoder.block."),
}


def decay_names(model) -> list[str]:
    return Trainer.get_decay_parameter_names(None, model)


def expected_rate(arch: str, name: str) -> float:
    embeddings, layers = LAYOUTS[arch]
    if "relative_attention_bias" in name:  # T5: in block 0, but every layer uses it, like DeBERTa's rel_embeddings
        return LR
    if name.startswith(embeddings):
        return LR * DECAY**3
    if name.startswith(layers):
        block = int(name[len(layers) :].split(".")[0])
        return LR * DECAY ** (3 - 1 - block)
    return LR


def groups_by_name(groups, model) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, dict] = {}
    for group in groups:
        assert group["params"], f"empty group {group[GROUP_KEY]}"
        for param in group["params"]:
            name = names[id(param)]
            assert name not in found, f"{name} is in two groups"
            found[name] = group
    return found


@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "embeddings+1-frozen"])
@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_groups_hold_the_rates_and_the_weight_decay_split(arch, frozen):
    model = tiny_classifier(arch)
    if frozen:
        freeze_embeddings(model)
        freeze_first_n_layers(model, 1)
    groups = layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model))
    found = groups_by_name(groups, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(found) == sorted(trainable)  # every trainable parameter once, no frozen one
    no_decay_seen = False
    for name in trainable:
        group = found[name]
        assert group["lr"] == pytest.approx(expected_rate(arch, name), rel=1e-12), name
        is_bias_or_norm = "bias" in name or "norm" in name.lower()
        assert group["weight_decay"] == (0.0 if is_bias_or_norm else WD), name
        assert group[GROUP_KEY].endswith("/no_decay" if is_bias_or_norm else "/decay"), name
        no_decay_seen |= is_bias_or_norm
    assert no_decay_seen
    if frozen:
        assert not any(g[GROUP_KEY].startswith(("embeddings", "layer.0/")) for g in groups)


def test_group_labels_and_order_for_bert():
    """From the output down: group 0, whose rate the Trainer logs as `learning_rate`, is at the base rate."""
    model = tiny_classifier("bert")
    labels = [g[GROUP_KEY] for g in layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model))]
    assert labels == [
        "head/decay",
        "head/no_decay",
        "layer.2/decay",
        "layer.2/no_decay",
        "layer.1/decay",
        "layer.1/no_decay",
        "layer.0/decay",
        "layer.0/no_decay",
        "embeddings/decay",
        "embeddings/no_decay",
    ]


def test_encoder_decoder_decoder_trains_at_the_base_rate():
    """T5 and BART: decay over the encoder; decoder blocks and final norm at lr; what freezing calls embeddings at
    lr * d**N (for BART also the decoder's position embeddings and embedding LayerNorm)."""
    for arch in ("t5", "bart"):
        model = tiny_classifier(arch)
        found = groups_by_name(layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model)), model)
        decoder = [n for n in found if ".decoder." in n]
        assert decoder
        for name in decoder:
            embedding = "embed_positions" in name or "layernorm_embedding" in name
            assert found[name]["lr"] == pytest.approx(LR * DECAY**3 if embedding else LR), name
    bart = tiny_classifier("bart")
    found = groups_by_name(layerwise_lr_groups(bart, LR, DECAY, WD, decay_names(bart)), bart)
    assert found["model.encoder.layers.0.fc1.weight"]["lr"] == pytest.approx(LR * DECAY**2)
    assert found["model.shared.weight"]["lr"] == pytest.approx(LR * DECAY**3)


def test_albert_shared_block_gets_the_rate_of_its_first_layer():
    model = tiny_classifier("albert")  # 3 layers run one shared block
    scales = layerwise_lr_scales(model, DECAY)
    assert scales["albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"] == ("layer.0", DECAY**2)
    assert scales["albert.embeddings.word_embeddings.weight"] == ("embeddings", DECAY**3)
    assert scales["albert.encoder.embedding_hidden_mapping_in.weight"] == ("head", 1.0)


def test_peft_lora_model_groups_only_the_lora_matrices_at_their_block_rates():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_classifier("bert"), LoraConfig(r=2, target_modules=["query", "value"]))
    found = groups_by_name(layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model)), model)
    lora = [n for n in found if "lora_" in n]
    assert len(lora) == 3 * 2 * 2  # 3 blocks x (query, value) x (A, B)
    for name in lora:
        block = int(name.split(".encoder.layer.")[1].split(".")[0])
        assert found[name]["lr"] == pytest.approx(LR * DECAY ** (2 - block)), name
    assert all(found[n]["lr"] == LR for n in found if n not in lora)  # the classifier PEFT keeps trainable


def test_decay_one_gives_the_base_rate_everywhere():
    model = tiny_classifier("bert")
    assert {g["lr"] for g in layerwise_lr_groups(model, LR, 1.0, WD, decay_names(model))} == {LR}


def test_without_decay_param_groups_for_is_the_trainers_split_at_the_base_rate():
    model = tiny_classifier("bert")
    names = [n for n, _ in model.named_parameters() if n.startswith("bert.encoder.layer.1.")]
    groups = param_groups_for(model, names, base_lr=LR, weight_decay=WD, decay_parameter_names=decay_names(model))
    assert [(g[GROUP_KEY], g["lr"], g["weight_decay"]) for g in groups] == [
        ("layer.1/decay", LR, WD),
        ("layer.1/no_decay", LR, 0.0),
    ]
    assert sum(len(g["params"]) for g in groups) == len(names)


def adamw_by_hand(model, rates: dict[str, tuple[float, float]], batch, steps: int, betas=(0.9, 0.999), eps=1e-8):
    """AdamW written out, each parameter with its own (lr, weight decay)."""
    params = {n: p for n, p in model.named_parameters() if n in rates}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(1, steps + 1):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                lr, wd = rates[name]
                p.mul_(1 - lr * wd)
                m[name].mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                v[name].mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                m_hat = m[name] / (1 - betas[0] ** t)
                v_hat = v[name] / (1 - betas[1] ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def test_adamw_with_the_groups_equals_a_hand_written_loop():
    model = tiny_classifier("bert")
    freeze_first_n_layers(model, 1)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 64, (4, 12), generator=g), "labels": torch.tensor([0, 1, 1, 0])}
    optimizer = torch.optim.AdamW(layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model)), lr=123.0)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    decayed = set(decay_names(reference))
    rates = {
        n: (expected_rate("bert", n), WD if n in decayed else 0.0)
        for n, p in reference.named_parameters()
        if p.requires_grad
    }
    adamw_by_hand(reference, rates, batch, steps=3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
    for (name, p), q in zip(model.named_parameters(), initial.parameters(), strict=True):
        assert torch.equal(p, q) != p.requires_grad, name  # trainable ones moved, frozen ones did not


def test_linear_schedule_keeps_every_ratio_at_every_step():
    model = tiny_classifier("llama")
    groups = layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model))
    base = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=10)
    for step in range(10):
        factor = scheduler.lr_lambdas[0](step)
        for group, rate in zip(optimizer.param_groups, base, strict=True):
            assert group["lr"] == pytest.approx(rate * factor, rel=1e-12, abs=1e-18)
        optimizer.step()
        scheduler.step()


def test_group_labels_survive_a_weights_only_checkpoint():
    model = tiny_classifier("bert")
    optimizer = torch.optim.AdamW(layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model)), lr=LR)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = torch.optim.AdamW(layerwise_lr_groups(model, LR, DECAY, WD, decay_names(model)), lr=LR)
    fresh.load_state_dict(state)
    assert [g[GROUP_KEY] for g in fresh.param_groups] == [g[GROUP_KEY] for g in optimizer.param_groups]


@pytest.mark.parametrize("decay", [0, 0.0, -0.5, 1.5, math.nan, True, "0.8", None])
def test_bad_decay_is_refused(decay):
    model = tiny_classifier("bert")
    with pytest.raises(ValueError, match=r"`decay` must be a number in \(0, 1\] \(1 turns the decay off\), got"):
        layerwise_lr_groups(model, LR, decay, WD, [])
    with pytest.raises(ValueError, match=r"`layerwise_lr_decay` must be a number in \(0, 1\]"):
        check_layerwise_lr_decay(decay)


def test_bad_rates_and_names_are_refused():
    model = tiny_classifier("bert")
    with pytest.raises(ValueError, match="`base_lr` must be a finite number >= 0, got -1"):
        layerwise_lr_groups(model, -1, DECAY, WD, [])
    with pytest.raises(ValueError, match="`weight_decay` must be a finite number >= 0, got inf"):
        layerwise_lr_groups(model, LR, DECAY, math.inf, [])
    with pytest.raises(ValueError, match="BertForSequenceClassification has no parameter named 'nope'"):
        param_groups_for(model, ["nope"], base_lr=LR, weight_decay=WD, decay_parameter_names=[])
