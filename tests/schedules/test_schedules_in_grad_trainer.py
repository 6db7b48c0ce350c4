"""The fine-tuning schedules wired into GradTrainer: LLRD, gradual unfreezing into the live optimizer, frozen
modules in eval mode."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers as T
from torch import nn

from hf_gradtools import GradTrainer, GradTrainingArguments, freeze, unfreeze
from hf_gradtools.checkpoints import TRAINING_STATE_FILE
from hf_gradtools.schedules import GROUP_KEY, layerwise_lr_groups
from tests.conftest import classification_data, grad_args, tiny_classifier, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

LR, DECAY = 1e-2, 0.5


def settings(**overrides) -> dict:
    return dict(learning_rate=LR, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=2, **overrides)


class StepRecorder(T.TrainerCallback):
    """Calls `record(step)` after each `optimizer.step()`, before the schedules act at the step's end."""

    def __init__(self, record):
        self.record = record

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.record(state.global_step + 1)


@pytest.mark.parametrize("frozen", [0, 2])
def test_llrd_groups_hold_the_rates_and_equal_a_hand_loop(tmp_path, frozen):
    data = classification_data(24)
    args = grad_args(
        tmp_path, **settings(layerwise_lr_decay=DECAY, max_steps=5, max_grad_norm=0.0, freeze_first_n_layers=frozen)
    )
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    labels = [g[GROUP_KEY] for g in trainer.create_optimizer().param_groups]
    initial = [g["lr"] for g in trainer.optimizer.param_groups]
    blocks = [f"layer.{i}" for i in range(2, frozen - 1, -1)]
    assert labels == [f"{label}/{kind}" for label in ["head", *blocks, "embeddings"] for kind in ("decay", "no_decay")]
    rates = {"head": LR, "layer.2": LR, "layer.1": LR * DECAY, "layer.0": LR * DECAY**2, "embeddings": LR * DECAY**3}
    assert initial == pytest.approx([rates[label.split("/")[0]] for label in labels], rel=1e-12)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.01, 0.0] * (len(labels) // 2)
    trainer.train()

    # The same groups by hand: same optimizer class and kwargs, same schedule, same batches.
    model = tiny_classifier()
    for layer in model.bert.encoder.layer[:frozen]:
        freeze(layer)
    groups = layerwise_lr_groups(model, LR, DECAY, 0.01, T.Trainer.get_decay_parameter_names(None, model))
    optimizer_cls, kwargs = T.Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(groups, **kwargs)
    scheduler = T.get_linear_schedule_with_warmup(optimizer, 2, 5)
    ids, targets = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    for step in range(5):
        rows = slice(4 * step, 4 * step + 4)
        model(input_ids=ids[rows], labels=targets[rows]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    for (name, p), q in zip(model.named_parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=name)


def test_linear_scheduler_keeps_every_groups_ratio(tmp_path):
    seen = []
    args = grad_args(tmp_path, **settings(layerwise_lr_decay=DECAY, max_steps=6))
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(24))
    trainer.add_callback(StepRecorder(lambda step: seen.append([g["lr"] for g in trainer.optimizer.param_groups])))
    trainer.train()
    first = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    assert first[::2] == pytest.approx([LR, LR, LR * DECAY, LR * DECAY**2, LR * DECAY**3], rel=1e-12)
    factors = [trainer.lr_scheduler.lr_lambdas[0](step) for step in range(6)]
    assert factors == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25])  # warmup 2, then linear decay to 0 at step 6
    assert seen == [pytest.approx([rate * factor for rate in first], rel=1e-9) for factor in factors]


def test_an_optimizer_instance_with_llrd_is_refused_before_anything_is_written(tmp_path):
    model = tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = grad_args(tmp_path, layerwise_lr_decay=0.8)
    with pytest.raises(ValueError, match=r"`layerwise_lr_decay`=0.8 .* optimizer instance \(SGD\)"):
        GradTrainer(model=model, args=args, train_dataset=classification_data(8), optimizers=(optimizer, None))
    assert not (tmp_path / "out").exists()


def test_optimizer_cls_and_kwargs_is_honoured_with_llrd(tmp_path):
    args = grad_args(tmp_path, layerwise_lr_decay=DECAY, max_steps=1)
    trainer = GradTrainer(
        model=tiny_classifier(),
        args=args,
        train_dataset=classification_data(8),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1.0, "momentum": 0.9}),
    )
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert [g["lr"] for g in optimizer.param_groups][::2] == pytest.approx(
        [LR, LR, LR * DECAY, LR * DECAY**2, LR * DECAY**3]
    )


def frozen_run(tmp_path, seed=0, **overrides):
    args = grad_args(
        tmp_path,
        **settings(
            freeze_embeddings=True,
            freeze_first_n_layers=2,
            gradual_unfreeze_steps=2,
            layerwise_lr_decay=0.8,
            max_steps=6,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            log_grad_noise_scale=True,
            **overrides,
        ),
    )
    return GradTrainer(model=tiny_classifier(seed=seed), args=args, train_dataset=classification_data(24))


def test_gradual_unfreezing_a_block_trains_from_its_step_at_its_llrd_rate(tmp_path):
    trainer = frozen_run(tmp_path)
    layer1 = trainer.model.bert.encoder.layer[1]
    before = copy.deepcopy(layer1.state_dict())
    seen = {}

    def record(step):
        held = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
        changed = any(not torch.equal(v, before[k]) for k, v in layer1.state_dict().items())
        rates = sorted({held[id(p)]["lr"] for p in layer1.parameters() if id(p) in held})
        seen[step] = (all(id(p) in held for p in layer1.parameters()), changed, rates)

    trainer.add_callback(StepRecorder(record))
    trainer.train()
    # Unfrozen at the end of step 2: bit-identical through step 2, in the optimizer and trained from step 3 on.
    assert [seen[s][:2] for s in range(1, 7)] == [(False, False)] * 2 + [(True, True)] * 4
    factor = trainer.lr_scheduler.lr_lambdas[0](2)  # the rate of step 3 was set by the scheduler's step 2
    assert seen[3][2] == [pytest.approx(LR * 0.8 * factor, rel=1e-9)]  # block 1 of 3: lr * 0.8 ** (3 - 1 - 1)
    assert all(p.requires_grad for p in trainer.model.parameters())
    logged = {h["step"]: h["unfrozen_blocks"] for h in trainer.state.log_history if "unfrozen_blocks" in h}
    assert logged == {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3}
    record_file = json.loads((tmp_path / "out" / "frozen_parameters.json").read_text())
    assert [(e["step"], e["unfrozen"]) for e in record_file["history"]] == [
        (2, "layer.1"),
        (4, "layer.0"),
        (6, "embeddings"),
    ]
    assert record_file["frozen"] == [] and record_file["unfreeze_plan"] == ["layer.1", "layer.0", "embeddings"]


def test_a_run_resumed_between_two_events_equals_an_uninterrupted_run(tmp_path):
    full = frozen_run(tmp_path / "full")
    full.train()
    frozen_run(tmp_path / "parts", save_strategy="steps", save_steps=3).train()
    checkpoint = tmp_path / "parts" / "out" / "checkpoint-3"
    saved = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
    assert saved["unfreezer"]["position"] == 1 and saved["noise_scale"]["steps"] == 3

    resumed = frozen_run(tmp_path / "resumed", seed=5)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=name)

    def logged(trainer, key):
        return {h["step"]: h[key] for h in trainer.state.log_history if key in h}

    # The log history carries on from the checkpoint's: steps 4 to 6 were logged by the resumed run.
    assert (
        logged(resumed, "unfrozen_blocks") == logged(full, "unfrozen_blocks") == {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3}
    )
    noise = logged(full, "grad_noise_scale")
    assert sorted(noise) == list(range(1, 7))
    assert logged(resumed, "grad_noise_scale") == pytest.approx(noise, rel=1e-6)
    history = json.loads((tmp_path / "resumed" / "out" / "frozen_parameters.json").read_text())["history"]
    assert [e["unfrozen"] for e in history] == ["layer.1", "layer.0", "embeddings"]


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear, self.norm, self.dropout = nn.Linear(width, width), nn.BatchNorm1d(width), nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.norm(self.linear(x)))


class BlockRegressor(nn.Module):
    """Two blocks with BatchNorm and dropout, then a linear head; returns `{"loss": mean squared error}`."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, 1)

    def forward(self, x, labels=None):
        for block in self.blocks:
            x = block(x)
        return {"loss": (self.head(x).squeeze(-1) - labels).square().mean()}


def regression_rows(n: int, width: int = 4) -> list[dict]:
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(3))
    return [{"x": row, "labels": row.sum()} for row in x]


@pytest.mark.parametrize("eval_mode", [True, False])
def test_frozen_eval_mode_keeps_frozen_dropout_and_batchnorm_in_eval_at_every_step(tmp_path, eval_mode):
    torch.manual_seed(0)
    model = BlockRegressor()
    freeze(model.blocks[0])
    frozen, trainable = model.blocks[0], model.blocks[1]
    stats = copy.deepcopy(frozen.norm.state_dict())
    modes = []
    model.head.register_forward_pre_hook(
        lambda m, _: modes.append((frozen.norm.training, frozen.dropout.training, trainable.norm.training, m.training))
    )
    args = grad_args(
        tmp_path, frozen_eval_mode=eval_mode, max_steps=4, gradient_accumulation_steps=2, loss_normalization="sample"
    )
    GradTrainer(model=model, args=args, train_dataset=regression_rows(32)).train()
    assert modes == [(not eval_mode, not eval_mode, True, True)] * 8
    unchanged = all(torch.equal(v, stats[k]) for k, v in frozen.norm.state_dict().items())
    assert unchanged == eval_mode
    assert int(trainable.norm.num_batches_tracked) == 8


def test_fields_parse_from_the_command_line_and_json(tmp_path):
    parser = T.HfArgumentParser(GradTrainingArguments)
    line = "--layerwise_lr_decay 0.8 --gradual_unfreeze_steps 50 --freeze_first_n_layers 2 --frozen_eval_mode "
    line += "--log_grad_noise_scale --grad_noise_scale_beta 0.99 --gradient_accumulation_steps 4"
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *line.split()])
    assert (args.layerwise_lr_decay, args.gradual_unfreeze_steps, args.frozen_eval_mode) == (0.8, 50, True)
    assert (args.log_grad_noise_scale, args.grad_noise_scale_beta) == (True, 0.99)
    (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert (default.layerwise_lr_decay, default.gradual_unfreeze_steps, default.frozen_eval_mode) == (None, 0, False)
    assert (default.log_grad_noise_scale, default.grad_noise_scale_beta) == (False, 0.95)
    path = tmp_path / "args.json"
    fields = {"layerwise_lr_decay": 0.9, "gradual_unfreeze_steps": 3, "freeze_embeddings": True}
    path.write_text(json.dumps({"output_dir": str(tmp_path), **fields, "log_grad_noise_scale": True}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        parser.parse_json_file(str(path))
    path.write_text(json.dumps({"output_dir": str(tmp_path), **fields, "gradient_accumulation_steps": 2}))
    (from_json,) = parser.parse_json_file(str(path))
    assert (from_json.layerwise_lr_decay, from_json.gradual_unfreeze_steps) == (0.9, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layerwise_lr_decay": 0.0}, r"`layerwise_lr_decay` must be .*got 0.0"),
        ({"layerwise_lr_decay": 1.5}, r"`layerwise_lr_decay` must be .*got 1.5"),
        ({"layerwise_lr_decay": math.nan}, r"`layerwise_lr_decay` must be"),
        ({"gradual_unfreeze_steps": -1}, r"`gradual_unfreeze_steps` must be a non-negative integer, got -1"),
        ({"gradual_unfreeze_steps": 5}, r"`gradual_unfreeze_steps`=5 but nothing is frozen"),
        (
            {
                "gradual_unfreeze_steps": 5,
                "freeze_embeddings": True,
                "lr_scheduler_type": "reduce_lr_on_plateau",
                "eval_strategy": "steps",
            },
            r"`gradual_unfreeze_steps`=5 cannot .*'reduce_lr_on_plateau'",
        ),
        ({"frozen_eval_mode": "yes"}, r"`frozen_eval_mode` must be True or False, got 'yes'"),
        ({"log_grad_noise_scale": True}, r"`log_grad_noise_scale`=True needs `gradient_accumulation_steps` >= 2"),
        ({"grad_noise_scale_beta": 1.0}, r"`grad_noise_scale_beta` must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_values_are_refused_naming_field_value_and_allowed(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        GradTrainingArguments(str(tmp_path / "out"), report_to="none", **fields)
    assert not (tmp_path / "out").exists()


def test_a_model_with_nothing_left_to_unfreeze_is_refused_before_training(tmp_path):
    config = tiny_config("bert")
    model = T.AutoModelForSequenceClassification.from_config(config)
    args = grad_args(tmp_path, freeze_embeddings=True, gradual_unfreeze_steps=2, max_steps=1)
    trainer = GradTrainer(model=model, args=args, train_dataset=classification_data(8))
    unfreeze(model.bert.embeddings)  # thawed by hand after construction: nothing the settings froze is left frozen
    with pytest.raises(ValueError, match=r"`gradual_unfreeze_steps`=2 but BertForSequenceClassification has no block"):
        trainer.train()
