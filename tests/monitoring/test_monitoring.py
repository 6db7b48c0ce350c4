"""Per-layer gradient norms against norms computed by hand; the report of parameters that got no gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_gradtools.clipping import clip_gradients
from hf_gradtools.freezing import freeze_embeddings
from hf_gradtools.monitoring import LayerNormGrouper, no_grad_warning, parameters_without_grad
from tests.conftest import tiny_classifier, token_rows


def bert_with_grads(frozen_embeddings: bool = False) -> nn.Module:
    model = tiny_classifier("bert")
    if frozen_embeddings:
        freeze_embeddings(model)
    ids = torch.tensor(token_rows(4))
    model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    return model


def by_hand(model: nn.Module, norm_type: float) -> dict[str, float]:
    """The norm of each group's gradients concatenated into one vector, groups chosen by literal name prefixes."""
    members: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if name.startswith("bert.embeddings."):
            key = "grad_norm/embeddings"
        elif name.startswith("bert.encoder.layer."):
            key = f"grad_norm/layer.{name.split('.')[3]}"
        else:
            key = "grad_norm/head"
        members.setdefault(key, []).append(param.grad.flatten())
    return {key: torch.linalg.vector_norm(torch.cat(g), norm_type).item() for key, g in members.items()}


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return bert_with_grads()


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.0])
def test_group_norms_equal_norms_by_hand_on_tiny_bert(bert, norm_type):
    model = bert
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    result = clip_gradients([p for _, p in params], max_norm=None, norm_type=norm_type)
    logs = LayerNormGrouper(model, [n for n, _ in params]).logs(result.param_norms, norm_type)
    expected = by_hand(model, norm_type)
    keys = ["grad_norm/embeddings", "grad_norm/layer.0", "grad_norm/layer.1", "grad_norm/layer.2", "grad_norm/head"]
    assert list(logs) == keys and sorted(expected) == sorted(keys)
    for key in keys:
        assert isinstance(logs[key], float)
        assert logs[key] == pytest.approx(expected[key], rel=1e-5), key
    # The groups partition the parameters: combined, they give the total norm.
    combined = torch.linalg.vector_norm(torch.tensor(list(logs.values())), norm_type).item()
    assert combined == pytest.approx(result.total_norm.item(), rel=1e-5)


def test_frozen_groups_are_absent():
    model = bert_with_grads(frozen_embeddings=True)
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    grouper = LayerNormGrouper(model, names)
    assert grouper.keys == ["grad_norm/layer.0", "grad_norm/layer.1", "grad_norm/layer.2", "grad_norm/head"]
    norms = clip_gradients([p for p in model.parameters() if p.grad is not None]).param_norms
    assert grouper.logs(norms) == pytest.approx(by_hand(model, 2.0), rel=1e-5)


def test_model_without_layer_stack_or_embeddings_has_only_a_head():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    names = [n for n, _ in model.named_parameters()]
    grouper = LayerNormGrouper(model, names)
    assert grouper.logs(torch.tensor([3.0, 0.0, 0.0, 4.0])) == {"grad_norm/head": 5.0}


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
        self.head = nn.Linear(2, 1)


BLOCK_NAMES = ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias", "head.weight", "head.bias"]


def test_large_p_neither_overflows_nor_underflows():
    grouper = LayerNormGrouper(Blocks(), BLOCK_NAMES)
    assert grouper.keys == ["grad_norm/layer.0", "grad_norm/layer.1", "grad_norm/head"]
    norms = torch.tensor([1e30, 1e30, 1e-30, 2e-30, 3.0, 0.0])
    got = grouper.group_norms(norms, 4.0)
    # Summed directly, (1e30) ** 4 overflows float32 and (1e-30) ** 4 underflows to 0.
    assert got.tolist() == pytest.approx([1e30 * 2 ** (1 / 4), (1 + 16) ** (1 / 4) * 1e-30, 3.0], rel=1e-6)
    assert grouper.group_norms(torch.zeros(6), 2.0).tolist() == [0.0, 0.0, 0.0]


def test_non_finite_norms_stay_in_their_group():
    grouper = LayerNormGrouper(Blocks(), BLOCK_NAMES)
    for norm_type in (2.0, math.inf):
        got = grouper.group_norms(torch.tensor([1.0, math.nan, math.inf, 1.0, 3.0, 4.0]), norm_type).tolist()
        assert math.isnan(got[0]) and got[1] == math.inf
        assert got[2] == (5.0 if norm_type == 2.0 else 4.0)


def test_norms_of_another_length_are_refused():
    grouper = LayerNormGrouper(Blocks(), BLOCK_NAMES)
    with pytest.raises(ValueError, match=r"one norm per name \(6\), got shape \(5,\)"):
        grouper.group_norms(torch.ones(5))
    with pytest.raises(ValueError, match="`norm_type` must be a positive number"):
        grouper.group_norms(torch.ones(6), 0)


class Branches(nn.Module):
    """`used` feeds the loss; `cut` does too, but through `.detach()`; `unused` never runs; `frozen` is frozen."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(2, 1)
        self.cut = nn.Linear(2, 1)
        self.unused = nn.Linear(2, 1)
        self.frozen = nn.Linear(2, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.used(x) + self.cut(x).detach() + self.frozen(x)


def test_parameters_without_grad_and_the_warning():
    model = Branches()
    model(torch.ones(3, 2)).sum().backward()
    names = parameters_without_grad(model)
    assert names == ["cut.weight", "cut.bias", "unused.weight", "unused.bias"]
    assert no_grad_warning(names) == (
        "4 trainable parameters received no gradient at the first optimizer step (an unused branch or head, or a "
        "graph cut by .detach()?): cut.weight, cut.bias, unused.weight, unused.bias"
    )
    assert no_grad_warning(names[:1]).startswith("1 trainable parameter received no gradient")
    assert no_grad_warning(names, limit=2).endswith(": cut.weight, cut.bias (and 2 more)")


def test_a_full_bert_step_leaves_no_parameter_without_grad(bert):
    assert parameters_without_grad(bert) == []
    assert parameters_without_grad(bert_with_grads(frozen_embeddings=True)) == []
