"""`clip_with_algorithm`: value clipping first, then norm, AGC or AutoClip, against the same steps done by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hf_gradtools.clipping import (
    AutoClip,
    ClipResult,
    agc_clip_,
    check_clip_algorithm,
    clip_coefficient,
    clip_with_algorithm,
)


def model_with_grads() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)  # no gradient: skipped
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape) * 0.5
    return model


def twin(model: nn.Module) -> nn.Module:
    """A copy with copies of the gradients (`deepcopy` leaves `.grad` behind)."""
    other = copy.deepcopy(model)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return other


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def norm_of(tensors: list[torch.Tensor], norm_type: float) -> float:
    return torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), norm_type).item()


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_equals_torch_value_then_norm_clipping(norm_type):
    model = model_with_grads()
    reference = twin(model)
    before = [g.clone() for g in grads(model)]
    result = clip_with_algorithm(model.named_parameters(), "norm", norm_type=norm_type, clip_value=0.4, max_norm=0.5)
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.4)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, norm_type=norm_type)
    for got, expected in zip(grads(model), grads(reference), strict=True):
        torch.testing.assert_close(got, expected)
    assert result.total_norm.item() == pytest.approx(norm_of(before, norm_type), rel=1e-6)
    assert result.total_norm_post_clip.item() == pytest.approx(norm_of(grads(model), norm_type), rel=1e-5)
    assert len(result.param_norms) == 3


def test_agc_after_value_clipping_equals_the_hand_loop():
    model = model_with_grads()
    by_hand = twin(model)
    before = [g.clone() for g in grads(model)]
    result = clip_with_algorithm(
        model.named_parameters(), "agc", norm_type=1.0, clip_value=0.4, max_norm=1e-9, agc_clip_factor=0.05,
        agc_exclude=[r"^2\.weight$"],
    )  # fmt: skip
    for g in grads(by_hand):
        g.clamp_(-0.4, 0.4)
    agc_clip_(by_hand.named_parameters(), clip_factor=0.05, exclude=[r"^2\.weight$"])
    for got, expected in zip(grads(model), grads(by_hand), strict=True):
        assert torch.equal(got, expected)
    assert not torch.equal(grads(model)[0], before[0].clamp(-0.4, 0.4))  # AGC clipped something (max_norm unused)
    assert result.total_norm.item() == pytest.approx(norm_of(before, 1.0), rel=1e-6)
    assert result.total_norm_post_clip.item() == pytest.approx(norm_of(grads(model), 1.0), rel=1e-6)
    assert clip_coefficient(result).item() == pytest.approx(
        norm_of(grads(model), 1.0) / norm_of(before, 1.0), rel=1e-6
    )


def test_autoclip_records_the_norm_after_value_clipping():
    model = model_with_grads()
    before = [g.clone() for g in grads(model)]
    clipper = AutoClip(percentile=50)
    clipper.load_state_dict({"history": [0.1, 0.2]})
    result = clip_with_algorithm(model.named_parameters(), "autoclip", clip_value=0.4, autoclip=clipper)
    clamped = [g.clamp(-0.4, 0.4) for g in before]
    seen = norm_of(clamped, 2.0)
    assert clipper.history == pytest.approx([0.1, 0.2, seen], rel=1e-6)
    coef = 0.2 / (seen + 1e-6)  # median of [0.1, 0.2, seen > 0.2]
    for got, expected in zip(grads(model), clamped, strict=True):
        torch.testing.assert_close(got, expected * coef)
    assert result.total_norm.item() == pytest.approx(norm_of(before, 2.0), rel=1e-6)
    assert result.total_norm_post_clip.item() == pytest.approx(0.2, rel=1e-5)


def test_bad_algorithm_and_missing_autoclip():
    assert check_clip_algorithm("agc") == "agc"
    with pytest.raises(
        ValueError, match="`clip_algorithm` must be one of 'norm', 'agc', 'autoclip', 'zclip', got 'AGC'"
    ):
        check_clip_algorithm("AGC")
    with pytest.raises(ValueError, match="needs the run's AutoClip as `autoclip`, got None"):
        clip_with_algorithm(model_with_grads().named_parameters(), "autoclip")


def test_clip_coefficient_edge_cases():
    def result(pre: float, post: float) -> ClipResult:
        return ClipResult(torch.zeros(0), torch.tensor(pre), torch.tensor(post))

    assert clip_coefficient(result(4.0, 1.0)).item() == 0.25
    assert clip_coefficient(result(0.0, 0.0)).item() == 1.0
    assert math.isnan(clip_coefficient(result(math.nan, math.nan)).item())
