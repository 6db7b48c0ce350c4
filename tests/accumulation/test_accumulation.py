"""Gradient accumulation equals one large batch: same gradient, same logged loss."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from datasets import Dataset

from hf_gradtools import GradTrainer
from hf_gradtools.accumulation import (
    ELEMENT,
    SAMPLE,
    SHIFTED_TOKEN,
    SUM,
    TOKEN,
    ItemRule,
    count_items,
    micro_batch_loss_weights,
)
from tests.conftest import classification_data, tiny_classifier, tiny_config


class GradCapture(T.TrainerCallback):
    """Copies every gradient right before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def run(trainer_cls, model, data, args_factory, **kw):
    capture = GradCapture()
    args = args_factory(max_grad_norm=0.0, learning_rate=0.0, num_train_epochs=1, max_steps=-1, **kw)
    if trainer_cls is T.Trainer:
        args = T.TrainingArguments(
            **{k: v for k, v in args.to_dict().items() if k in T.TrainingArguments.__dataclass_fields__}
        )
    trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=[capture])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return capture.grads, losses, norms


def reference_grads(model, batches):
    """Gradient of the mean loss over all samples of `batches`, by hand."""
    model.zero_grad()
    total = sum(len(b["labels"]) for b in batches)
    loss = sum(model(**b).loss * len(b["labels"]) for b in batches) / total
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads, loss.item()


def assert_grads_close(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def as_batch(data, rows):
    return {k: torch.tensor(data[rows][k]) for k in data.column_names}


def test_splits_of_one_batch_give_one_gradient_and_one_loss(args_factory):
    """(batch 8, acc 1), (4, 2), (2, 4) give one gradient and one loss; the plain Trainer's double each time."""
    data = classification_data(8)
    ours, plain = [], []
    for batch, acc in [(8, 1), (4, 2), (2, 4)]:
        kw = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=acc)
        ours.append(run(GradTrainer, tiny_classifier(), data, args_factory, **kw))
        plain.append(run(T.Trainer, tiny_classifier(), data, args_factory, **kw))
    expected, expected_loss = reference_grads(tiny_classifier(), [as_batch(data, slice(0, 8))])
    for grads, losses, norms in ours:
        assert_grads_close(grads[0], expected)
        assert losses[0] == pytest.approx(expected_loss, rel=1e-5)
        assert norms[0] == pytest.approx(ours[0][2][0], rel=1e-5)
    # The plain Trainer (transformers 5.x) does not divide BERT's mean loss: x1, x2, x4.
    ratios = [p[2][0] / plain[0][2][0] for p in plain]
    assert ratios == pytest.approx([1.0, 2.0, 4.0], rel=1e-4)
    assert [p[1][0] / plain[0][1][0] for p in plain] == pytest.approx([1.0, 2.0, 4.0], rel=1e-4)


def test_unequal_micro_batches_and_short_last_window(args_factory):
    data = classification_data(10, seed=3)
    # 10 rows, batch 4, accumulation 3: one window of micro-batches 4, 4, 2.
    grads, losses, _ = run(
        GradTrainer,
        tiny_classifier(),
        data,
        args_factory,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
    )
    expected, expected_loss = reference_grads(tiny_classifier(), [as_batch(data, slice(0, 10))])
    assert len(grads) == 1
    assert_grads_close(grads[0], expected)
    assert losses[0] == pytest.approx(expected_loss, rel=1e-5)
    # 10 rows, batch 2, accumulation 4: windows of 8 rows, then a shorter one of 2 rows.
    grads, losses, _ = run(
        GradTrainer,
        tiny_classifier(),
        data,
        args_factory,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    assert len(grads) == 2
    model = tiny_classifier()
    assert_grads_close(grads[0], reference_grads(model, [as_batch(data, slice(0, 8))])[0])
    last, last_loss = reference_grads(model, [as_batch(data, slice(8, 10))])
    assert_grads_close(grads[1], last)
    assert losses[1] == pytest.approx(last_loss, rel=1e-5)


def test_regression_head(args_factory):
    g = torch.Generator().manual_seed(5)
    data = Dataset.from_dict(
        {"input_ids": classification_data(6)["input_ids"], "labels": torch.randn(6, generator=g).tolist()}
    )
    model_fn = lambda: tiny_classifier(num_labels=1)  # noqa: E731
    one, _, _ = run(GradTrainer, model_fn(), data, args_factory, per_device_train_batch_size=6)
    split, _, _ = run(
        GradTrainer, model_fn(), data, args_factory, per_device_train_batch_size=2, gradient_accumulation_steps=3
    )
    assert_grads_close(one[0], split[0])


def lm_data():
    """Causal LM rows whose label-token counts differ, one row with no label token at all."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 64, (4, 10), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # 3 targets after the shift (positions 7, 8, 9)
    labels[1, :] = -100  # no target at all
    labels[2, :3] = -100  # 7 targets
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def test_token_level_loss_is_mean_over_label_tokens(args_factory):
    data = lm_data()

    def lm():
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(tiny_config("gpt2"))

    runs = [
        run(GradTrainer, lm(), data, args_factory, per_device_train_batch_size=b, gradient_accumulation_steps=a)
        for b, a in [(4, 1), (2, 2), (1, 4)]
    ]
    # By hand: sum of the token losses over all 3 + 0 + 7 + 9 targets, divided by 19.
    model = lm()
    logits = model(input_ids=torch.tensor(data["input_ids"])).logits[:, :-1]
    targets = torch.tensor(data["labels"])[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), reduction="sum") / 19
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for grads, losses, _ in runs:
        assert_grads_close(grads[0], expected)
        assert losses[0] == pytest.approx(loss.item(), rel=1e-5)
        assert all(torch.isfinite(g).all() for g in grads[0].values())


def test_weights_by_hand():
    batches = [{"labels": torch.tensor([[-100, 5, 6], [-100, -100, 7]])}, {"labels": torch.tensor([[1, 2, 3]])}]
    assert count_items(batches[0], TOKEN) == 3
    assert count_items(batches[0], SHIFTED_TOKEN) == 3
    assert count_items(batches[0], SAMPLE) == 2
    assert micro_batch_loss_weights(batches, TOKEN).tolist() == pytest.approx([0.5, 0.5])
    assert micro_batch_loss_weights(batches, SHIFTED_TOKEN).tolist() == pytest.approx([0.6, 0.4])
    assert micro_batch_loss_weights(batches, SAMPLE).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert micro_batch_loss_weights(batches, SUM).tolist() == [1.0, 1.0]
    assert micro_batch_loss_weights(batches, SUM, world_size=2).tolist() == [2.0, 2.0]
    ignore_255 = ItemRule("token", ignore_index=255)
    assert micro_batch_loss_weights(
        [{"labels": torch.tensor([[255, 1]])}, {"labels": torch.tensor([[2, 3]])}], ignore_255
    ).tolist() == pytest.approx([1 / 3, 2 / 3])
    floats = [{"labels": torch.zeros(3, 2)}, {"labels": torch.zeros(1, 2)}]
    assert micro_batch_loss_weights(floats, ELEMENT).tolist() == pytest.approx([0.75, 0.25])
    rows = [{"input_ids": torch.zeros(3, 4), "start_positions": torch.zeros(3)}, {"input_ids": torch.zeros(1, 4)}]
    assert micro_batch_loss_weights(rows, SAMPLE).tolist() == pytest.approx([0.75, 0.25])
    # Two processes, this one holds 4 of the 10 items of the window: DDP averages, so the weights sum to 0.8.
    assert micro_batch_loss_weights(
        floats, ELEMENT, world_size=2, gather_sum=lambda t: t * 2.5
    ).tolist() == pytest.approx([0.6, 0.2])
    assert micro_batch_loss_weights([{"labels": torch.tensor([-100])}], TOKEN).tolist() == [0.0]
