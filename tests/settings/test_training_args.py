"""GradTrainingArguments: command line, JSON, and every bad value rejected with the field named."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import HfArgumentParser

from hf_gradtools import GradTrainer, GradTrainingArguments, NoTrainableParametersError, freeze, get_frozen_parameters
from tests.conftest import classification_data, tiny_classifier


def test_command_line_round_trip(tmp_path):
    parser = HfArgumentParser(GradTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--freeze_embeddings",
            "--freeze_first_n_layers",
            "2",
            "--clip_norm_type",
            "inf",
            "--clip_grad_value",
            "0.5",
            "--grad_snapshot_steps",
            "10",
            "--max_grad_norm",
            "1.0",
            "--report_to",
            "none",
        ]
    )
    assert args.freeze_embeddings is True and args.freeze_first_n_layers == 2
    assert args.clip_norm_type == math.inf and args.clip_grad_value == 0.5 and args.grad_snapshot_steps == 10
    (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert (
        default.freeze_embeddings,
        default.freeze_first_n_layers,
        default.clip_norm_type,
        default.clip_grad_value,
        default.grad_snapshot_steps,
    ) == (False, 0, 2.0, None, 0)


def test_json_round_trip(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(
        json.dumps(
            {"output_dir": str(tmp_path), "clip_norm_type": "inf", "freeze_first_n_layers": 3, "report_to": "none"}
        )
    )
    (args,) = HfArgumentParser(GradTrainingArguments).parse_json_file(str(path))
    assert args.clip_norm_type == math.inf and args.freeze_first_n_layers == 3
    dumped = json.loads(args.to_json_string())  # strict JSON: inf written as "inf"
    assert dumped["clip_norm_type"] == "inf"
    again = GradTrainingArguments(**{k: v for k, v in args.to_dict().items() if k in ("output_dir", "clip_norm_type")})
    assert again.clip_norm_type == math.inf


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("freeze_first_n_layers", -1, "`freeze_first_n_layers` must be a non-negative integer, got -1"),
        ("freeze_first_n_layers", 1.5, "`freeze_first_n_layers` must be a non-negative integer, got 1.5"),
        ("grad_snapshot_steps", -3, "`grad_snapshot_steps` must be a non-negative integer, got -3"),
        ("clip_norm_type", 0, "`clip_norm_type` must be a positive number or 'inf'.*got 0"),
        ("clip_norm_type", -2.0, "`clip_norm_type` must be a positive number or 'inf'.*got -2.0"),
        ("clip_norm_type", "fro", "`clip_norm_type` must be a positive number or 'inf'.*got 'fro'"),
        ("clip_grad_value", 0.0, "`clip_grad_value` must be a positive finite number or None.*got 0.0"),
        ("clip_grad_value", -1.0, "`clip_grad_value` must be a positive finite number or None.*got -1.0"),
        ("clip_grad_value", math.inf, "`clip_grad_value` must be a positive finite number or None.*got inf"),
        ("freeze_embeddings", "yes", "`freeze_embeddings` must be True or False, got 'yes'"),
        # The Trainer's own fields that accumulation rests on: it fails inside `train()`, or trains 0 steps (-1).
        ("gradient_accumulation_steps", 0, "`gradient_accumulation_steps` must be an integer of at least 1, got 0"),
        ("gradient_accumulation_steps", -1, "`gradient_accumulation_steps` must be an integer of at least 1, got -1"),
        (
            "gradient_accumulation_steps",
            2.5,
            "`gradient_accumulation_steps` must be an integer of at least 1, got 2.5",
        ),
        ("per_device_train_batch_size", 0, "`per_device_train_batch_size` must be an integer of at least 1, got 0"),
        ("learning_rate", -1.0, "`learning_rate` must be a finite number of at least 0, got -1.0"),
    ],
)
def test_bad_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        GradTrainingArguments(output_dir=str(tmp_path / "out"), **{field: value})
    assert not os.path.exists(tmp_path / "out")


def test_too_many_layers_fails_before_training_and_writes_nothing(args_factory, tmp_path):
    model = tiny_classifier()
    before = {n: p.clone() for n, p in model.named_parameters()}
    args = args_factory(freeze_embeddings=True, freeze_first_n_layers=5)
    with pytest.raises(
        ValueError, match=r"`freeze_first_n_layers`=5 but BertForSequenceClassification has only 3 layers"
    ):
        GradTrainer(model=model, args=args, train_dataset=classification_data(4))
    assert not os.path.exists(args.output_dir)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert get_frozen_parameters(model) == []


def test_nothing_left_to_train_fails_before_training(args_factory):
    model = tiny_classifier()
    freeze([model.classifier, model.bert.pooler])
    args = args_factory(freeze_embeddings=True, freeze_first_n_layers=3)
    with pytest.raises(
        NoTrainableParametersError, match="No trainable parameter is left in BertForSequenceClassification"
    ):
        GradTrainer(model=model, args=args, train_dataset=classification_data(4))
    assert not os.path.exists(args.output_dir)


def test_unknown_architecture_fails_before_training(args_factory):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x, labels=None):
            return {"loss": self.linear(x).sum()}

    with pytest.raises(ValueError, match="Could not find the transformer layer stack of Tiny"):
        GradTrainer(model=Tiny(), args=args_factory(freeze_first_n_layers=1))


def test_model_init_is_frozen_too(args_factory):
    args = args_factory(freeze_embeddings=True, freeze_first_n_layers=1, max_steps=1)
    trainer = GradTrainer(model_init=lambda: tiny_classifier(), args=args, train_dataset=classification_data(4))
    assert get_frozen_parameters(trainer.model)[0] == "bert.embeddings.word_embeddings.weight"
    trainer.train()  # train() calls model_init again: the new model is frozen the same way
    assert "bert.encoder.layer.0.output.dense.weight" in get_frozen_parameters(trainer.model)


def test_an_all_frozen_model_is_refused_before_anything_is_written(args_factory):
    from transformers import Trainer

    model = tiny_classifier()
    freeze(model)  # frozen by hand, every new field at its default
    args = args_factory()
    trainer = GradTrainer(model=model, args=args, train_dataset=classification_data(4))
    assert os.listdir(args.output_dir) == []  # what `Trainer.__init__` writes: the empty output folder
    with pytest.raises(
        NoTrainableParametersError,
        match=r"No trainable parameter in BertForSequenceClassification: all 57 of its parameter tensors have "
        r"`requires_grad=False`",
    ):
        trainer.train()
    assert os.listdir(args.output_dir) == []  # no frozen_parameters.json, no snapshot, no checkpoint
    # The refusal takes nothing from a run that succeeds: the plain Trainer fails too, at the first backward.
    plain = Trainer(model=model, args=args, train_dataset=classification_data(4))
    with pytest.raises(RuntimeError, match="does not require grad"):
        plain.train()
    # Evaluating a frozen model is left as it is.
    data = classification_data(8)
    assert trainer.evaluate(data)["eval_loss"] == plain.evaluate(data)["eval_loss"]


def test_a_peft_model_loaded_for_inference_is_refused_and_a_trainable_one_trains(args_factory, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    trainable = peft.get_peft_model(tiny_classifier(), config)
    trainable.save_pretrained(tmp_path / "adapter")
    GradTrainer(model=trainable, args=args_factory(max_steps=1), train_dataset=classification_data(4)).train()
    inference = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path / "adapter", is_trainable=False)
    trainer = GradTrainer(model=inference, args=args_factory(max_steps=1), train_dataset=classification_data(4))
    with pytest.raises(
        NoTrainableParametersError,
        match=r"No trainable parameter in PeftModelForSequenceClassification \(around BertForSequenceClassification\)",
    ):
        trainer.train()


def test_a_frozen_model_with_an_optimizer_of_other_tensors_trains_as_with_the_trainer(args_factory):
    from transformers import Trainer

    def run(trainer_class):
        model = tiny_classifier()
        freeze(model)
        shift = torch.nn.Parameter(torch.zeros(2))  # trained outside the model, through the loss

        def loss(outputs, labels, num_items_in_batch=None):
            return torch.nn.functional.cross_entropy(outputs.logits + shift, labels)

        trainer_class(
            model=model,
            args=args_factory(max_steps=2),
            train_dataset=classification_data(8),
            compute_loss_func=loss,
            optimizers=(torch.optim.SGD([shift], lr=0.5), None),
        ).train()
        return shift.detach()

    grad, plain = run(GradTrainer), run(Trainer)
    assert not torch.equal(plain, torch.zeros(2))
    torch.testing.assert_close(grad, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("field", ["grad_snapshot_tensors", "agc_exclude"])
def test_a_pattern_list_given_as_none_reads_as_none(tmp_path, field):
    args = GradTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **{field: None})
    assert getattr(args, field) == []
    (parsed,) = HfArgumentParser(GradTrainingArguments).parse_dict(
        {"output_dir": str(tmp_path / "out"), "report_to": "none", field: None}
    )
    assert getattr(parsed, field) == [] and json.loads(parsed.to_json_string())[field] == []
    assert not os.path.exists(tmp_path / "out")
