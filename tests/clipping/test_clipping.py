"""Clipping against torch's reference functions and hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from hf_gradtools import clip_gradients
from hf_gradtools.clipping import check_norm_type


def two_params(g1, g2):
    module = torch.nn.Module()
    module.a = torch.nn.Parameter(torch.zeros(len(g1)))
    module.b = torch.nn.Parameter(torch.zeros(len(g2)))
    module.a.grad = torch.tensor(g1, dtype=torch.float32)
    module.b.grad = torch.tensor(g2, dtype=torch.float32)
    return module


# a.grad = [3, -4], b.grad = [12]: L1 = 19, L2 = 13, Linf = 12, per-parameter L2 = 5 and 12.
@pytest.mark.parametrize(
    "norm_type, total, per_param",
    [(1.0, 19.0, [7.0, 12.0]), (2.0, 13.0, [5.0, 12.0]), (math.inf, 12.0, [4.0, 12.0])],
)
def test_hand_worked_norms(norm_type, total, per_param):
    module = two_params([3.0, -4.0], [12.0])
    result = clip_gradients(module.parameters(), max_norm=1.0, norm_type=norm_type)
    assert result.param_norms.tolist() == pytest.approx(per_param)
    assert result.total_norm.item() == pytest.approx(total)
    scale = 1.0 / (total + 1e-6)
    assert module.a.grad.tolist() == pytest.approx([3.0 * scale, -4.0 * scale])
    assert result.total_norm_post_clip.item() == pytest.approx(1.0, abs=1e-5)


def test_no_clipping_below_max_norm():
    module = two_params([3.0, -4.0], [12.0])
    result = clip_gradients(module.parameters(), max_norm=20.0)
    assert module.a.grad.tolist() == [3.0, -4.0]
    assert result.total_norm_post_clip.item() == pytest.approx(13.0)


def random_grads(seed, shapes=((7, 5), (5,), (3, 4, 2))):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return params


@pytest.mark.parametrize("norm_type", [0.5, 1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.1, 1e3])
def test_matches_torch_clip_grad_norm(norm_type, max_norm):
    ours, ref = random_grads(0), random_grads(0)
    result = clip_gradients(ours, max_norm=max_norm, norm_type=norm_type)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert result.total_norm.item() == pytest.approx(ref_norm.item(), rel=1e-6)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    expected_post = torch.nn.utils.get_total_norm([p.grad for p in ours], norm_type)
    assert result.total_norm_post_clip.item() == pytest.approx(expected_post.item(), rel=1e-5)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_value_then_norm_matches_torch(norm_type):
    ours, ref = random_grads(1), random_grads(1)
    pre = torch.nn.utils.get_total_norm([p.grad for p in ref], norm_type)
    result = clip_gradients(ours, max_norm=2.0, norm_type=norm_type, clip_value=0.5)
    torch.nn.utils.clip_grad_value_(ref, 0.5)
    torch.nn.utils.clip_grad_norm_(ref, 2.0, norm_type)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert result.total_norm.item() == pytest.approx(pre.item(), rel=1e-6)  # logged: before any clipping
    post = torch.nn.utils.get_total_norm([p.grad for p in ref], norm_type)
    assert result.total_norm_post_clip.item() == pytest.approx(post.item(), rel=1e-5)
    assert max(p.grad.abs().max().item() for p in ours) <= 0.5


def test_value_only_matches_torch():
    ours, ref = random_grads(2), random_grads(2)
    clip_gradients(ours, clip_value=1.0)
    torch.nn.utils.clip_grad_value_(ref, 1.0)
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p.grad, q.grad)


def test_skips_missing_grads_and_empty():
    module = two_params([3.0, -4.0], [12.0])
    module.b.grad = None
    assert clip_gradients(module.parameters(), max_norm=1.0).total_norm.item() == pytest.approx(5.0)
    assert clip_gradients([], max_norm=1.0).total_norm.item() == 0.0


@pytest.mark.parametrize("bad", [0, -1.0, "abc", float("nan"), True, None])
def test_bad_norm_type(bad):
    with pytest.raises(ValueError, match="`norm_type` must be a positive number or 'inf'"):
        check_norm_type(bad)


def test_norm_type_strings():
    assert check_norm_type("inf") == math.inf
    assert check_norm_type("1.5") == 1.5
