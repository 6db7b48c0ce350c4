"""Gradual unfreezing: the plan, events at the right steps, new groups in a live optimizer and scheduler, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, get_linear_schedule_with_warmup, get_scheduler

from hf_gradtools import freeze, freeze_embeddings, freeze_first_n_layers
from hf_gradtools.schedules import (
    GROUP_KEY,
    GradualUnfreezer,
    add_param_groups,
    layerwise_lr_groups,
    unfreeze_order,
)
from tests.conftest import tiny_classifier

pytestmark = pytest.mark.usefixtures("single_thread")

LR, DECAY, WD = 1e-2, 0.5, 0.01


def frozen_bert(n_layers: int = 2):
    model = tiny_classifier("bert")
    frozen = freeze_embeddings(model) + freeze_first_n_layers(model, n_layers)
    return model, frozen


def test_unfreeze_order_highest_block_first_embeddings_last():
    model, frozen = frozen_bert(2)
    plan = unfreeze_order(model, frozen)
    assert [event.label for event in plan] == ["layer.1", "layer.0", "embeddings"]
    assert [n for event in plan for n in event.parameter_names] == (
        [n for n in frozen if n.startswith("bert.encoder.layer.1.")]
        + [n for n in frozen if n.startswith("bert.encoder.layer.0.")]
        + [n for n in frozen if n.startswith("bert.embeddings.")]
    )
    assert unfreeze_order(model) == plan  # every frozen parameter is the same here


def test_unfreeze_order_keeps_parameters_frozen_by_others():
    model, frozen = frozen_bert(1)
    freeze(model.bert.encoder.layer[2].attention)  # as PEFT's base weights would be: not ours to unfreeze
    plan = unfreeze_order(model, frozen)
    assert [event.label for event in plan] == ["layer.0", "embeddings"]
    assert [event.label for event in unfreeze_order(model)] == ["layer.2", "layer.0", "embeddings"]


def test_unfreeze_order_t5_encoder_blocks_and_albert_shared_block():
    t5 = tiny_classifier("t5")
    frozen = freeze_embeddings(t5) + freeze_first_n_layers(t5, 2)
    assert [event.label for event in unfreeze_order(t5, frozen)] == ["layer.1", "layer.0", "embeddings"]
    albert = tiny_classifier("albert")
    with pytest.warns(UserWarning, match="shares 1 block"):
        frozen = freeze_first_n_layers(albert, 1)
    assert [event.label for event in unfreeze_order(albert, frozen)] == ["layer.0"]
    assert unfreeze_order(tiny_classifier("bert")) == []


def test_due_events_by_step():
    model, frozen = frozen_bert(2)
    unfreezer = GradualUnfreezer(unfreeze_order(model, frozen), every_n_steps=3, base_lr=LR)
    assert [unfreezer.step_of(i) for i in range(3)] == [3, 6, 9]
    assert unfreezer.due(2) == []
    assert [e.label for e in unfreezer.due(3)] == ["layer.1"]
    assert [e.label for e in unfreezer.due(100)] == ["layer.1", "layer.0", "embeddings"]
    assert unfreezer.position == 0  # `due` changes nothing


def make_run(every_n: int = 2, llrd: float | None = DECAY):
    """A tiny BERT with embeddings + 2 layers frozen, its optimizer, linear scheduler and unfreezer."""
    model, frozen = frozen_bert(2)
    decay_names = Trainer.get_decay_parameter_names(None, model)
    if llrd is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    else:
        optimizer = torch.optim.AdamW(layerwise_lr_groups(model, LR, llrd, WD, decay_names), lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=12)
    unfreezer = GradualUnfreezer(
        unfreeze_order(model, frozen),
        every_n,
        base_lr=LR,
        weight_decay=WD,
        decay_parameter_names=decay_names,
        layerwise_lr_decay=llrd,
    )
    return model, optimizer, scheduler, unfreezer


BATCH = {
    "input_ids": torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0)),
    "labels": torch.tensor([0, 1, 1, 0]),
}


def train_step(model, optimizer, scheduler, unfreezer, step: int) -> list[str]:
    """One optimizer step as the Trainer orders it; returns the labels unfrozen at its end."""
    optimizer.zero_grad(set_to_none=True)
    model(**BATCH).loss.backward()
    optimizer.step()
    scheduler.step()
    return [event.label for event in unfreezer.apply_due(step, model, optimizer, scheduler)]


def test_a_block_changes_from_its_step_on_with_its_llrd_rate():
    model, optimizer, scheduler, unfreezer = make_run(every_n=2)
    layer1 = model.bert.encoder.layer[1]
    before = copy.deepcopy(layer1.state_dict())
    events = {}
    for step in range(1, 6):
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        holds_layer1 = all(id(p) in in_optimizer for p in layer1.parameters())
        changed = any(not torch.equal(v, before[k]) for k, v in layer1.state_dict().items())
        # Unfrozen at the end of step 2: bit-identical through step 2, trained from step 3 on.
        assert holds_layer1 == (step > 2) and changed == (step > 3), step
        events[step] = train_step(model, optimizer, scheduler, unfreezer, step)
    assert events == {1: [], 2: ["layer.1"], 3: [], 4: ["layer.0"], 5: []}
    blocks = [*model.bert.encoder.layer[1].parameters(), *model.bert.encoder.layer[0].parameters()]
    assert unfreezer.unfrozen_parameters(model) == blocks  # what DDP would not reduce
    # The added groups have the rate they would have had from the start: LLRD rate times the schedule factor.
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    reference = {
        g[GROUP_KEY]: g["lr"] * factor
        for g in layerwise_lr_groups(model, LR, DECAY, WD, Trainer.get_decay_parameter_names(None, model))
    }
    assert {g[GROUP_KEY]: g["lr"] for g in optimizer.param_groups} == pytest.approx(reference, rel=1e-12)
    assert [g[GROUP_KEY] for g in optimizer.param_groups][-4:] == [
        "layer.1/decay",
        "layer.1/no_decay",
        "layer.0/decay",
        "layer.0/no_decay",
    ]
    assert optimizer.param_groups[-1]["initial_lr"] == pytest.approx(LR * DECAY**2)
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == len(scheduler.get_last_lr()) == 8


def test_a_group_added_mid_run_follows_the_scheduler_at_every_later_step():
    model, optimizer, scheduler, unfreezer = make_run(every_n=3, llrd=None)
    for step in range(1, 12):
        train_step(model, optimizer, scheduler, unfreezer, step)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(LR * factor, rel=1e-12, abs=1e-15), (step, group.get(GROUP_KEY))
    assert [g.get(GROUP_KEY) for g in optimizer.param_groups][1:] == [
        "layer.1/decay",
        "layer.1/no_decay",
        "layer.0/decay",
        "layer.0/no_decay",
        "embeddings/decay",
        "embeddings/no_decay",
    ]
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup", "polynomial", "inverse_sqrt"])
def test_add_param_groups_takes_the_current_factor_of_transformers_schedules(kind):
    old, new = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(old.parameters(), lr=0.1)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    add_param_groups(optimizer, [{"params": list(new.parameters()), "lr": 0.02}], scheduler)
    for _ in range(3):
        assert optimizer.param_groups[1]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"] * 0.2, rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_add_param_groups_without_a_scheduler_and_refusals():
    old, new, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(old.parameters(), lr=0.1)
    add_param_groups(optimizer, [{"params": [new.weight]}])
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[1]["initial_lr"] == 0.1
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match="Cannot add parameter groups under a ReduceLROnPlateau"):
        add_param_groups(optimizer, [{"params": [new.bias]}], plateau)
    elsewhere = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="drives another optimizer"):
        add_param_groups(optimizer, [{"params": [new.bias]}], torch.optim.lr_scheduler.LambdaLR(elsewhere, abs))
    with pytest.raises(ValueError, match="`like_group`=5 but the scheduler has 2 group"):
        add_param_groups(optimizer, [{"params": [new.bias]}], torch.optim.lr_scheduler.LambdaLR(optimizer, abs), 5)


def test_add_param_groups_through_accelerate_wrappers():
    from accelerate import Accelerator

    old, new = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(old.parameters(), lr=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=10)
    wrapped_optimizer, wrapped_scheduler = Accelerator(cpu=True).prepare(optimizer, scheduler)
    for _ in range(5):
        wrapped_optimizer.step()
        wrapped_scheduler.step()
    add_param_groups(wrapped_optimizer, [{"params": list(new.parameters()), "lr": 0.02}], wrapped_scheduler)
    assert [round(g["lr"], 9) for g in wrapped_optimizer.param_groups] == [0.05, 0.01]
    assert len(scheduler.base_lrs) == 2


def test_resume_between_two_events_equals_an_uninterrupted_run():
    steps, every_n, stop = 9, 3, 4  # events at the ends of steps 3, 6, 9; the checkpoint after step 4
    model, optimizer, scheduler, unfreezer = make_run(every_n)
    for step in range(1, steps + 1):
        train_step(model, optimizer, scheduler, unfreezer, step)

    first, optimizer, scheduler, unfreezer = make_run(every_n)
    for step in range(1, stop + 1):
        train_step(first, optimizer, scheduler, unfreezer, step)
    checkpoint = copy.deepcopy(
        {
            "model": first.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "unfreezer": unfreezer.state_dict(),
        }
    )
    assert checkpoint["unfreezer"] == {
        "position": 1,
        "every_n_steps": 3,
        "labels": ["layer.1", "layer.0", "embeddings"],
    }

    resumed, optimizer, scheduler, unfreezer = make_run(every_n)  # fresh: frozen again, initial groups
    resumed.load_state_dict(checkpoint["model"])
    unfreezer.load_state_dict(checkpoint["unfreezer"])
    assert [e.label for e in unfreezer.replay(resumed, optimizer, scheduler)] == ["layer.1"]
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    for step in range(stop + 1, steps + 1):
        train_step(resumed, optimizer, scheduler, unfreezer, step)

    assert unfreezer.position == 3
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert p.requires_grad and q.requires_grad
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


def test_state_checks():
    model, optimizer, scheduler, unfreezer = make_run(every_n=2)
    state = unfreezer.state_dict()
    with pytest.raises(ValueError, match="`gradual_unfreeze_steps`=3 but the checkpoint was trained with 2"):
        make_run(every_n=3)[3].load_state_dict(state)
    with pytest.raises(ValueError, match="differs from the checkpoint's"):
        unfreezer.load_state_dict({**state, "labels": ["layer.0"]})
    unfreezer.load_state_dict({**state, "position": 1})
    with pytest.raises(RuntimeError, match="Call `replay\\(\\)` after `load_state_dict\\(\\)`"):
        unfreezer.apply_due(10, model, optimizer, scheduler)
    unfreezer.replay(model, optimizer, scheduler)
    assert unfreezer.position == 1
    with pytest.raises(RuntimeError, match="needs a fresh GradualUnfreezer"):
        unfreezer.load_state_dict(state)


def test_an_unsupported_scheduler_is_refused_before_anything_changes():
    model, optimizer, _, unfreezer = make_run(every_n=1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    groups = len(optimizer.param_groups)
    with pytest.raises(ValueError, match="Cannot add parameter groups under a ReduceLROnPlateau"):
        unfreezer.apply_due(1, model, optimizer, plateau)
    assert unfreezer.position == 0 and len(optimizer.param_groups) == groups
    assert not any(p.requires_grad for p in model.bert.encoder.layer[1].parameters())


@pytest.mark.parametrize("every_n", [0, -2, 1.5, True])
def test_bad_interval_is_refused(every_n):
    with pytest.raises(ValueError, match="`gradual_unfreeze_steps` must be a positive integer here, got"):
        GradualUnfreezer([], every_n, base_lr=LR)
