"""The schedules wired into a plain `transformers.Trainer`: the reference recipe for `GradTrainerMixin`.

`ScheduledTrainer` shows where each piece goes: LLRD groups in `create_optimizer`, frozen eval mode in
`compute_loss` (the Trainer calls it right after `model.train()`), unfreezing in a callback's `on_step_end` (after
the optimizer and scheduler steps), and the unfreezer's position saved beside the optimizer and replayed before the
optimizer state loads.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as T

from hf_gradtools import freeze_embeddings, freeze_first_n_layers
from hf_gradtools.schedules import (
    GROUP_KEY,
    GradualUnfreezer,
    layerwise_lr_groups,
    set_frozen_eval_mode,
    unfreeze_order,
)
from tests.conftest import classification_data, tiny_classifier, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

STATE_FILE = "hf_gradtools_schedules.json"


class UnfreezeCallback(T.TrainerCallback):
    def __init__(self, unfreezer: GradualUnfreezer):
        self.unfreezer = unfreezer
        self.history: list[tuple[int, str]] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        for event in self.unfreezer.apply_due(state.global_step, model, optimizer, lr_scheduler):
            self.history.append((state.global_step, event.label))


class ScheduledTrainer(T.Trainer):
    def __init__(self, *args, layerwise_lr_decay=None, unfreeze_every=0, frozen=(), eval_frozen=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.layerwise_lr_decay = layerwise_lr_decay
        self.eval_frozen = eval_frozen
        self.unfreeze_callback = None
        if unfreeze_every:
            unfreezer = GradualUnfreezer(
                unfreeze_order(self.model, frozen),
                unfreeze_every,
                base_lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                decay_parameter_names=self.get_decay_parameter_names(self.model),
                layerwise_lr_decay=layerwise_lr_decay,
            )
            self.unfreeze_callback = UnfreezeCallback(unfreezer)
            self.add_callback(self.unfreeze_callback)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.layerwise_lr_decay is not None:
            opt_model = self.model if model is None else model
            if self.optimizer_cls_and_kwargs is not None:  # honoured: its kwargs' lr is each group's default
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = layerwise_lr_groups(
                opt_model,
                self.args.learning_rate,
                self.layerwise_lr_decay,
                self.args.weight_decay,
                self.get_decay_parameter_names(opt_model),
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.eval_frozen and model.training:
            set_frozen_eval_mode(model)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.unfreeze_callback is not None and self.args.should_save:
            with open(os.path.join(output_dir, STATE_FILE), "w") as f:
                json.dump({"unfreezer": self.unfreeze_callback.unfreezer.state_dict()}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and self.unfreeze_callback is not None:
            with open(os.path.join(checkpoint, STATE_FILE)) as f:
                self.unfreeze_callback.unfreezer.load_state_dict(json.load(f)["unfreezer"])
            self.unfreeze_callback.unfreezer.replay(self.model, self.optimizer, self.lr_scheduler)
        super()._load_optimizer_and_scheduler(checkpoint)


def args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.01,
        max_steps=6,
        lr_scheduler_type="linear",
        warmup_steps=2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    return T.TrainingArguments(**{**settings, **overrides})


def frozen_model(seed: int = 0):
    model = tiny_classifier(seed=seed)
    return model, freeze_embeddings(model) + freeze_first_n_layers(model, 2)


def test_llrd_groups_in_the_trainer_keep_their_ratios_and_log_the_base_rate(tmp_path):
    model = tiny_classifier()
    trainer = ScheduledTrainer(
        model=model, args=args(tmp_path, max_steps=3), train_dataset=classification_data(12), layerwise_lr_decay=0.5
    )
    trainer.train()
    groups = trainer.optimizer.param_groups
    factor = trainer.lr_scheduler.lr_lambdas[0](3)
    assert [g[GROUP_KEY] for g in groups][::2] == [
        "head/decay",
        "layer.2/decay",
        "layer.1/decay",
        "layer.0/decay",
        "embeddings/decay",
    ]
    expected = [1e-2, 1e-2, 5e-3, 2.5e-3, 1.25e-3]
    assert [g["lr"] for g in groups][::2] == pytest.approx([rate * factor for rate in expected], rel=1e-9)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged[-1] == pytest.approx(1e-2 * trainer.lr_scheduler.lr_lambdas[0](2), rel=1e-9)


def test_gradual_unfreezing_resumed_between_two_events_equals_an_uninterrupted_run(tmp_path):
    data = classification_data(24)
    common = dict(layerwise_lr_decay=0.8, unfreeze_every=2, train_dataset=data)

    model, frozen = frozen_model()
    full = ScheduledTrainer(model=model, args=args(tmp_path / "full"), frozen=frozen, **common)
    full.train()
    assert full.unfreeze_callback.history == [(2, "layer.1"), (4, "layer.0"), (6, "embeddings")]

    model, frozen = frozen_model()
    parts = args(tmp_path / "parts", save_strategy="steps", save_steps=3)
    ScheduledTrainer(model=model, args=parts, frozen=frozen, **common).train()

    model, frozen = frozen_model(seed=5)
    resumed = ScheduledTrainer(model=model, args=args(tmp_path / "resumed"), frozen=frozen, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "out" / "checkpoint-3"))
    assert resumed.unfreeze_callback.history == [(4, "layer.0"), (6, "embeddings")]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


def test_frozen_dropout_is_off_at_every_training_step(tmp_path):
    config = tiny_config("bert")
    config.hidden_dropout_prob = 0.1
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_config(config)
    freeze_embeddings(model)
    freeze_first_n_layers(model, 2)
    seen = []
    frozen_dropout = model.bert.encoder.layer[1].output.dropout
    trainable_dropout = model.bert.encoder.layer[2].output.dropout
    frozen_dropout.register_forward_pre_hook(lambda m, _: seen.append((m.training, trainable_dropout.training)))
    trainer = ScheduledTrainer(
        model=model, args=args(tmp_path, max_steps=3), train_dataset=classification_data(12), eval_frozen=True
    )
    trainer.train()
    assert seen == [(False, True)] * 3
