"""The loss probe's pieces on losses written by hand: how a loss answers `num_items_in_batch`, ties on the first
window, rules no split can test, and the gradient check that sees what loss values do not."""

from __future__ import annotations

import torch

from hf_gradtools.accumulation import SHIFTED_TOKEN, TOKEN
from hf_gradtools.accumulation.loss_probe import (
    drop_one_label,
    probe_count_response,
    probe_loss_normalization,
    project_on_random_signs,
    split_gradient_error,
    toggle_position_zero,
)


def token_mean(batch, shift=False):
    """A per-token mean of `x` over the targets (after the causal shift when `shift`)."""
    x, labels = batch["x"], batch["labels"]
    if shift:
        x, labels = x[:, 1:], labels[:, 1:]
    targets = labels.ne(-100)
    return float((x * targets).sum() / targets.sum())


def test_count_response_tells_dividing_ignoring_and_mixed_losses_apart():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    batch = {"x": x, "labels": torch.tensor([[1, 1, -100], [1, 1, 1]])}
    total = float(x[:, :2].sum() + x[1, 2])

    def divides(b, n):  # the Trainer's contract: a sum, divided by the count when one is given
        return total if n is None else total / float(n)

    response = probe_count_response(divides, [batch], torch.tensor(5))
    assert response.kind == "divides"
    assert [own for _, own in response.own_counts] == [1.0]  # it divides by nothing without a count: a sum
    mean = lambda b, n: total / 5  # noqa: E731
    assert probe_count_response(mean, [batch], 5).kind == "ignores"
    assert probe_count_response(lambda b, n: divides(b, n) + 0.5, [batch], 5).kind == "mixed"
    assert probe_count_response(lambda b, n: float("nan"), [batch], 5).kind == "unknown"


def test_position_zero_is_changed_where_no_row_labels_it():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, 6, -100], [-100, -100, -100, -100]])
    assert toggle_position_zero(labels).tolist() == [[7, -100, 7, 8], [5, 5, 6, -100], [-100] * 4]
    assert toggle_position_zero(torch.tensor([[3, 4], [-100, 4]])).tolist() == [[-100, 4], [4, 4]]
    assert toggle_position_zero(torch.full((2, 3), -100)) is None


def test_one_label_fewer_in_the_row_with_most():
    batch = {"labels": torch.tensor([[1, 2, -100], [3, 4, 5]]), "x": torch.zeros(2, 3)}
    assert drop_one_label(batch, -100)["labels"].tolist() == [[1, 2, -100], [3, 4, -100]]
    assert drop_one_label({"labels": torch.tensor([1, 0])}, -100) is None  # one label a row: nothing to drop


def test_a_tie_on_the_first_window_is_decided_by_what_the_loss_reads():
    """No row labels position 0: shifted and unshifted token rules weight this window alike, not the next."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[-100, 1, 1, 1, 1]] * 2 + [[-100, -100, -100, 1, 1]] * 2)
    batch = {"x": torch.rand(4, 5, generator=g), "labels": labels}
    assert probe_loss_normalization(token_mean, [batch]).rule == TOKEN
    assert probe_loss_normalization(lambda b: token_mean(b, shift=True), [batch]).rule == SHIFTED_TOKEN


def test_rules_that_cannot_be_tested_are_not_beaten():
    """One-row micro-batches of different lengths: a per-row mean fits the token rules as well as the sample rule
    it is, which no split can test. Not established; with the count a dividing loss divides by, it is."""
    g = torch.Generator().manual_seed(1)
    rows = [{"x": torch.rand(1, n, generator=g), "labels": torch.ones(1, n, dtype=torch.long)} for n in (3, 5)]
    result = probe_loss_normalization(token_mean, rows)
    assert result.rule is None and not result.conclusive and "cannot test sample" in result.reason
    own = [(row, float(row["labels"].ne(-100).sum())) for row in rows]  # a loss that divides by its token count
    assert probe_loss_normalization(token_mean, rows, own_counts=own).rule == TOKEN


def test_the_gradient_check_sees_what_the_loss_values_do_not():
    """A loss whose batch-level extra term is flat in value but not in gradient: exact values, inexact gradient."""
    weight = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    batch = {"x": torch.rand(4, 3, generator=torch.Generator().manual_seed(2)), "labels": torch.tensor([0, 1, 0, 1])}

    def project(b, count=None):
        scores = b["x"] @ weight
        loss = scores.mean() + 1e-3 * torch.cos(scores.sum())  # the second term does not split over rows
        return torch.autograd.grad(loss, [weight])[0].double()

    error = split_gradient_error(project, [batch], TOKEN)
    assert 1e-5 < error < 1e-2
    mean = lambda b, count=None: torch.autograd.grad((b["x"] @ weight).mean(), [weight])[0]  # noqa: E731
    assert split_gradient_error(mean, [batch], TOKEN) < 1e-6
    grads = [torch.tensor([1.0, 2.0]), None, torch.tensor([[3.0]])]
    # The same directions at every call, whichever parameters have no gradient.
    assert torch.equal(project_on_random_signs(grads), project_on_random_signs(grads))
    assert torch.equal(project_on_random_signs(grads), project_on_random_signs([grads[0], torch.zeros(4), grads[2]]))
    assert project_on_random_signs([None, None]).tolist() == [0.0] * 4


def test_the_host_scaling_is_described_for_the_window_at_hand():
    """A resumed run may start on an epoch's last window of one micro-batch: the host is exact there, and the log
    line for that window says so, where the run-wide one describes a whole window."""
    from types import SimpleNamespace

    from hf_gradtools.accumulation.probe import LossRuleProbe

    trainer = SimpleNamespace(
        args=SimpleNamespace(gradient_accumulation_steps=3),
        loss_is_scaled_for_ga=None,
        compute_loss_func=None,
        model_accepts_loss_kwargs=True,
    )
    probe, ignores = LossRuleProbe(trainer), SimpleNamespace(kind="ignores")
    assert "adds the 3 micro-batch losses without dividing them by 3" in probe._host_scaling(8, ignores)
    assert probe._host_scaling(8, ignores, micro_batches=1).endswith(
        "one micro-batch, its loss as it is: exact for a loss that is a mean over it"
    )
    trainer.model_accepts_loss_kwargs = False
    assert probe._host_scaling(None, None, micro_batches=2).startswith("each micro-batch loss divided by 2")
