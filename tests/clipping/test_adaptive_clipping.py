"""AGC and AutoClip against hand-worked values on toy modules whose `.grad` is set by hand."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import transformers as T
from torch import nn

from hf_gradtools.clipping.agc import agc_clip_, check_agc_settings, default_agc_exclude, transposed_weights
from hf_gradtools.clipping.autoclip import AutoClip
from hf_gradtools.layout import head_parameter_names
from tests.conftest import tiny_classifier, tiny_config


def _set(param: torch.Tensor, value, grad) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(value))
    param.grad = torch.tensor(grad)


def toy() -> nn.ModuleDict:
    """A linear layer, a conv layer and a classifier, weights and gradients set by hand."""
    model = nn.ModuleDict({"fc": nn.Linear(3, 2), "conv": nn.Conv2d(1, 2, (2, 2)), "classifier": nn.Linear(2, 1)})
    # fc rows have weight norms 3 and 5; clip factor 0.02 allows 0.06 and 0.1.
    # Row 0's gradient has norm 0.1 (clipped to 0.06: factor 0.6); row 1's has 0.05 (left alone).
    _set(model["fc"].weight, [[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], [[0.06, 0.0, 0.08], [0.0, 0.03, 0.04]])
    # A zero bias: its weight norm is floored at eps=1e-3, allowing 0.02 * 1e-3 = 2e-5; its gradient has 5e-5.
    _set(model["fc"].bias, [0.0, 0.0], [3e-5, 4e-5])
    # Conv output channels: weight norms 2 and 2 (norm over in-channels and kernel), allowing 0.04 each.
    # Channel 0's gradient has norm 1 (clipped by 0.04); channel 1's has 0.01 (left alone).
    _set(model["conv"].weight, [[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]],
         [[[[0.5, 0.5], [0.5, 0.5]]], [[[0.0, 0.0], [0.0, 0.01]]]])  # fmt: skip
    # Conv bias: weight norm 1 (0.02 allowed), gradient norm 0.01: left alone.
    _set(model["conv"].bias, [1.0, 0.0], [0.01, 0.0])
    # The classifier's gradient is far over its bound; excluded, it must stay as it is.
    _set(model["classifier"].weight, [[1.0, 0.0]], [[30.0, 40.0]])
    _set(model["classifier"].bias, [0.0], [7.0])
    return model


def test_agc_per_row_per_channel_eps_floor_and_excluded_head():
    model = toy()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    result = agc_clip_(model.named_parameters(), clip_factor=0.02, eps=1e-3, exclude=[r"^classifier\."])
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.testing.assert_close(grads["fc.weight"][0], torch.tensor([0.036, 0.0, 0.048]))
    assert torch.equal(grads["fc.weight"][1], before["fc.weight"][1])  # untouched, bit for bit
    torch.testing.assert_close(grads["fc.bias"], torch.tensor([1.2e-5, 1.6e-5]))
    torch.testing.assert_close(grads["conv.weight"][0], torch.full((1, 2, 2), 0.02))
    assert torch.equal(grads["conv.weight"][1], before["conv.weight"][1])
    assert torch.equal(grads["conv.bias"], before["conv.bias"])
    assert torch.equal(grads["classifier.weight"], before["classifier.weight"])
    assert torch.equal(grads["classifier.bias"], before["classifier.bias"])
    # Units: 2 fc rows + fc bias + 2 conv channels + conv bias; clipped: fc row 0, fc bias, conv channel 0.
    assert result.num_units == 6 and int(result.num_clipped) == 3
    assert result.total_norm_post_clip is None


def test_agc_without_exclusion_clips_the_head_and_reports_the_post_clip_norm():
    model = toy()
    result = agc_clip_(model.named_parameters(), clip_factor=0.02, norm_type=1.0)
    # Classifier weight row: weight norm 1 -> bound 0.02; bias: weight 0 -> eps floor -> bound 2e-5.
    torch.testing.assert_close(model["classifier"].weight.grad, torch.tensor([[0.012, 0.016]]))
    torch.testing.assert_close(model["classifier"].bias.grad, torch.tensor([2e-5]))
    assert int(result.num_clipped) == 5
    everything = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert result.total_norm_post_clip.item() == pytest.approx(everything.abs().sum().item(), rel=1e-6)


def _agc_by_rows(weight: torch.Tensor, grad: torch.Tensor, factor: float, eps: float) -> torch.Tensor:
    """Reference: one row at a time, as the paper writes it."""
    rows = [grad] if weight.ndim <= 1 else list(grad)
    weights = [weight] if weight.ndim <= 1 else list(weight)
    out = []
    for w, g in zip(weights, rows, strict=True):
        bound = factor * max(w.norm().item(), eps)
        norm = g.norm().item()
        out.append(g * (bound / norm) if norm > bound else g)
    return out[0] if weight.ndim <= 1 else torch.stack(out)


def test_agc_on_bert_equals_row_by_row_reference_and_skips_the_default_head():
    model = tiny_classifier("bert")
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 0.05
    expected = {n: _agc_by_rows(p.detach(), p.grad.clone(), 0.01, 1e-3) for n, p in model.named_parameters()}
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    exclude = default_agc_exclude(model)
    assert exclude == [r"^classifier\.weight$", r"^classifier\.bias$"]
    result = agc_clip_(model.named_parameters(), clip_factor=0.01, eps=1e-3, exclude=exclude, norm_type=2.0)
    changed = 0
    for name, p in model.named_parameters():
        if name.startswith("classifier."):
            assert torch.equal(p.grad, before[name]), name
        else:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-9, msg=name)
            changed += not torch.equal(p.grad, before[name])
    assert changed > 10  # the test data really clips
    everything = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert result.total_norm_post_clip.item() == pytest.approx(everything.norm().item(), rel=1e-5)


def test_agc_transposed_weights_use_columns():
    layer = nn.Linear(1, 1)  # only a holder for one (in=2, out=3) weight stored input-first
    layer.weight = nn.Parameter(torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]]))
    layer.weight.grad = torch.tensor([[0.3, 0.0, 0.0], [0.4, 1.0, 0.005]])
    agc_clip_([("w", layer.weight)], clip_factor=0.1, eps=1e-3, transposed=["w"])
    # Column norms of the weight 5, 0 (-> eps), 1: bounds 0.5, 1e-4, 0.1; gradient columns 0.5, 1, 0.005.
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[0.3, 0.0, 0.0], [0.4, 1e-4, 0.005]]))


def test_agc_skips_parameters_without_grad_and_handles_no_grads():
    layer = nn.Linear(2, 2)
    result = agc_clip_(layer.named_parameters(), norm_type=2.0)
    assert result.num_units == 0 and int(result.num_clipped) == 0 and result.total_norm_post_clip.item() == 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"clip_factor": 0.0}, "agc_clip_factor"),
        ({"clip_factor": -1.0}, "agc_clip_factor"),
        ({"clip_factor": math.inf}, "agc_clip_factor"),
        ({"clip_factor": True}, "agc_clip_factor"),
        ({"eps": 0.0}, "agc_eps"),
        ({"eps": math.nan}, "agc_eps"),
        ({"exclude": ["(unclosed"]}, "agc_exclude"),
        ({"exclude": "classifier"}, "agc_exclude"),
    ],
)
def test_agc_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        agc_clip_(toy().named_parameters(), **kwargs)
    settings = {"clip_factor": 0.01, "eps": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=f"`{field}`"):
        check_agc_settings(**settings)


@pytest.mark.parametrize(
    "arch, head",
    [
        ("bert", ["classifier.weight", "classifier.bias"]),
        ("roberta", ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                     "classifier.out_proj.bias"]),
        ("distilbert", ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"]),
        ("gpt2", ["score.weight"]),
    ],
)  # fmt: skip
def test_head_of_task_models(arch, head):
    assert head_parameter_names(tiny_classifier(arch)) == head


def test_head_of_lm_bare_and_custom_models():
    # GPT-2's LM head is tied to the input embedding: clipped as an embedding, nothing left to exclude.
    assert head_parameter_names(T.GPT2LMHeadModel(tiny_config("gpt2"))) == []
    # BERT's MLM head: its transform and bias; the decoder weight is the tied word embedding.
    mlm = head_parameter_names(T.BertForMaskedLM(tiny_config("bert")))
    assert mlm[0] == "cls.predictions.bias" and "cls.predictions.decoder.weight" not in mlm and len(mlm) == 5
    assert head_parameter_names(T.BertModel(tiny_config("bert"))) == []

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.head = nn.Linear(4, 2)

    assert head_parameter_names(Custom()) == ["head.weight", "head.bias"]

    class WithOutput(Custom):
        """A custom LM: its output embeddings are a head unless tied to the input embeddings."""

        def __init__(self, tied: bool):
            super().__init__()
            self.out = nn.Linear(4, 10)
            if tied:
                self.out.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.out

    assert head_parameter_names(WithOutput(tied=False)) == ["head.weight", "head.bias", "out.weight", "out.bias"]
    assert head_parameter_names(WithOutput(tied=True)) == ["head.weight", "head.bias", "out.bias"]


def test_transposed_weights_of_gpt2():
    names = transposed_weights(T.GPT2Model(tiny_config("gpt2")))
    assert len(names) == 12 and names[:4] == [
        "h.0.attn.c_attn.weight",
        "h.0.attn.c_proj.weight",
        "h.0.mlp.c_fc.weight",
        "h.0.mlp.c_proj.weight",
    ]


# ---- AutoClip ----


def test_autoclip_percentile_of_a_known_history():
    norms = [4.0, 1.0, 2.0, 10.0]
    # Sorted [1, 2, 4, 10]: the 25th percentile sits at position 0.75 -> 1 + 0.75 * (2 - 1) = 1.75; median 3.
    clipper = AutoClip(percentile=25)
    thresholds = [clipper.threshold(torch.tensor(n)).item() for n in norms]
    # [4] -> 4; [1, 4] at 0.25 -> 1.75; [1, 2, 4] at position 0.5 -> 1.5; then 1.75.
    assert thresholds == pytest.approx([4.0, 1.75, 1.5, 1.75])
    assert AutoClip(50).threshold(torch.tensor(1.0)).item() == 1.0
    median = AutoClip(50)
    for n in norms:
        value = median.threshold(n)
    assert value.item() == pytest.approx(3.0)
    assert clipper.history == norms and len(clipper) == 4


def test_autoclip_matches_numpy_percentile_past_the_first_buffer():
    generator = torch.Generator().manual_seed(3)
    norms = (torch.rand(150, generator=generator) * 5).tolist()
    clipper = AutoClip(percentile=10)
    for i, norm in enumerate(norms):
        got = clipper.threshold(torch.tensor(norm)).item()
        assert got == pytest.approx(np.percentile(np.float32(norms[: i + 1]), 10), rel=1e-6), i
    assert clipper.history == pytest.approx(norms, rel=1e-7)


def test_autoclip_clips_like_clip_grad_norm_to_the_percentile():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    clipper = AutoClip(percentile=50)
    clipper.load_state_dict({"history": [1.0, 2.0, 3.0]})
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # total L2 norm 13
    result = clipper.clip_([a, b], total_norm=torch.tensor(13.0))
    # History [1, 2, 3, 13]: median 2.5; the gradients are scaled by 2.5 / (13 + 1e-6).
    assert result.threshold.item() == pytest.approx(2.5)
    coef = 2.5 / (13 + 1e-6)
    assert result.clip_coef.item() == pytest.approx(coef, rel=1e-6)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) * coef)
    torch.testing.assert_close(b.grad, torch.tensor([12.0]) * coef)
    assert result.total_norm_post_clip.item() == pytest.approx(2.5, rel=1e-6)
    # A norm below the percentile is left alone (coefficient 1).
    a.grad = torch.tensor([0.1, 0.0])
    result = clipper.clip_([a, b], total_norm=0.1)
    assert result.clip_coef.item() == 1.0 and torch.equal(a.grad, torch.tensor([0.1, 0.0]))


def test_autoclip_resumes_exactly_from_its_state():
    norms = [0.5, 3.0, 1.25, 8.0, 0.75, 2.0, 6.5, 0.1]
    straight = AutoClip(20)
    expected = [straight.threshold(n).item() for n in norms]
    first = AutoClip(20)
    for n in norms[:5]:
        first.threshold(n)
    state = json.loads(json.dumps(first.state_dict()))  # a plain list of floats survives JSON
    assert state == {"history": norms[:5]}
    resumed = AutoClip(20)
    resumed.load_state_dict(state)
    assert [resumed.threshold(n).item() for n in norms[5:]] == expected[5:]


def test_autoclip_leaves_non_finite_norms_out():
    clipper = AutoClip(50)
    for n in [1.0, math.inf, 3.0, math.nan]:
        value = clipper.threshold(n)
    assert value.item() == pytest.approx(2.0)
    assert len(clipper) == 4 and math.isnan(clipper.history[1]) and math.isnan(clipper.history[3])


@pytest.mark.parametrize("bad", [0, -5, 100.5, math.nan, True, "10", None])
def test_autoclip_bad_percentile(bad):
    message = f"`autoclip_percentile` must be a number in (0, 100], got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoClip(bad)


def test_autoclip_percentile_100_is_the_largest_and_bad_state_is_refused():
    clipper = AutoClip(100)
    for n in [2.0, 9.0, 4.0]:
        value = clipper.threshold(n)
    assert value.item() == 9.0
    for state in [{}, {"history": "1,2"}, {"history": [1.0, "x"]}, [1.0]]:
        with pytest.raises(ValueError, match="AutoClip state must be"):
            clipper.load_state_dict(state)
