"""GradTrainer is Trainer where no feature is asked, side by side; it composes with other Trainer classes."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import pytest
import torch
import transformers as T

from hf_gradtools import (
    GradSeq2SeqTrainer,
    GradSeq2SeqTrainingArguments,
    GradSnapshotCallback,
    GradTrainer,
    GradTrainerMixin,
    LayerStackNotFoundError,
    load_grad_snapshots,
)
from tests.conftest import VOCAB, classification_data, grad_args, tiny_classifier, tiny_config, tiny_wav2vec2_config

COMMON = dict(
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    max_steps=4,
    report_to="none",
    save_steps=2,
    logging_steps=1,
    use_cpu=True,
    disable_tqdm=True,
    train_sampling_strategy="sequential",
    seed=0,
)


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def assert_same_run(plain, grad, plain_dir, grad_dir):
    """Two trained trainers are indistinguishable: callbacks, parameters bit for bit, logs (but times), files."""
    assert [type(c) for c in grad.callback_handler.callbacks] == [type(c) for c in plain.callback_handler.callbacks]
    for (name, p), (_, q) in zip(plain.model.named_parameters(), grad.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    strip = lambda h: {k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}  # noqa: E731
    assert [strip(h) for h in grad.state.log_history] == [strip(h) for h in plain.state.log_history]
    assert listing(grad_dir) == listing(plain_dir)


def test_default_grad_trainer_is_the_trainer(tmp_path):
    data = classification_data(16)
    plain_args = T.TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON)
    grad_args_ = T.TrainingArguments(output_dir=str(tmp_path / "grad"), **COMMON)
    plain = T.Trainer(model=tiny_classifier(), args=plain_args, train_dataset=data)
    grad = GradTrainer(model=tiny_classifier(), args=grad_args_, train_dataset=data)
    assert grad.args is grad_args_
    assert [type(c) for c in grad.callback_handler.callbacks] == [type(c) for c in plain.callback_handler.callbacks]
    plain.train()
    grad.train()
    assert_same_run(plain, grad, tmp_path / "plain", tmp_path / "grad")
    assert "frozen_parameters.json" not in os.listdir(tmp_path / "grad")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "mixed"])
def test_low_precision_parameters_clip_as_the_trainer_does(tmp_path, dtype):
    """bf16 or fp16 parameters (a model loaded in half precision), or some blocks in bf16: torch's
    `clip_grad_norm_` sums the norms in the gradients' dtype and by dtype group; the package's clipping gives the
    same norm and coefficient to the bit, so the logged norms and the weights are the Trainer's."""

    def model():
        m = tiny_classifier()
        if dtype == "mixed":  # the head in bf16, trained under autocast: two dtype groups
            return m.classifier.to(torch.bfloat16) and m
        return m.to(getattr(torch, dtype))

    data = classification_data(16)
    runs = []
    for cls, name in ((T.Trainer, "plain"), (GradTrainer, "grad")):
        args = T.TrainingArguments(
            output_dir=str(tmp_path / name), **{**COMMON, "max_grad_norm": 0.05, "bf16": dtype == "mixed"}
        )
        trainer = cls(model=model(), args=args, train_dataset=data)
        trainer.train()
        runs.append(trainer)
    norms = [h["grad_norm"] for h in runs[0].state.log_history if "grad_norm" in h]
    assert all(n > 0.05 for n in norms), norms  # every step clips
    assert_same_run(*runs, tmp_path / "plain", tmp_path / "grad")


def penalised(loss, model):
    return loss + 0.5 * sum(p.square().sum() for p in model.classifier.parameters())


class PenaltyTrainer(GradTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        return penalised(super().compute_loss(model, inputs, *args, **kwargs), model)


def test_a_compute_loss_set_on_the_instance_stays_and_is_used(tmp_path):
    """A user's `trainer.compute_loss = ...` (a penalty added) is used at every micro-batch, accumulated as a
    subclass's `compute_loss` is, and is still there after training, as with the Trainer."""
    data = classification_data(16)
    args = lambda name: T.TrainingArguments(  # noqa: E731
        output_dir=str(tmp_path / name), **{**COMMON, "gradient_accumulation_steps": 2}
    )
    runs = {}
    for cls in (T.Trainer, GradTrainer):
        trainer = cls(model=tiny_classifier(), args=args(cls.__name__), train_dataset=data)
        original, calls = trainer.compute_loss, []

        def with_penalty(model, inputs, *args, original=original, calls=calls, **kwargs):
            calls.append(None)
            return penalised(original(model, inputs, *args, **kwargs), model)

        trainer.compute_loss = with_penalty
        trainer.train()
        assert trainer.compute_loss is with_penalty
        runs[cls] = (trainer, len(calls))
    assert runs[GradTrainer][1] >= runs[T.Trainer][1] == 8  # every micro-batch (and the first window's probe)
    subclass = PenaltyTrainer(model=tiny_classifier(), args=args("subclass"), train_dataset=data)
    subclass.train()
    for (name, p), q in zip(subclass.model.named_parameters(), runs[GradTrainer][0].model.parameters(), strict=True):
        assert torch.equal(q, p), name


def test_snapshot_callback_only_when_something_is_recorded(tmp_path):
    frozen = GradTrainer(model=tiny_classifier(), args=grad_args(tmp_path, freeze_first_n_layers=1))
    snapshots = GradTrainer(model=tiny_classifier(), args=grad_args(tmp_path, grad_snapshot_steps=2))
    plain = GradTrainer(model=tiny_classifier(), args=grad_args(tmp_path))
    has = lambda t: any(isinstance(c, GradSnapshotCallback) for c in t.callback_handler.callbacks)  # noqa: E731
    assert has(frozen) and has(snapshots) and not has(plain)


@dataclass
class MyArgs(T.TrainingArguments):
    """A user's own arguments class with one extra field."""

    my_extra: int = field(default=3)


def test_argument_subclasses_are_taken_as_they_are(tmp_path):
    for args in (
        T.Seq2SeqTrainingArguments(str(tmp_path / "s"), report_to="none", use_cpu=True),
        MyArgs(str(tmp_path / "m"), report_to="none", use_cpu=True),
    ):
        trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(8))
        assert trainer.args is args
        args.max_steps = 1  # a change after construction is seen, since the object is the same
        trainer.train()
        assert trainer.state.global_step == 1


def test_a_field_changed_after_construction_is_checked_before_training(tmp_path):
    args = grad_args(tmp_path)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(8))
    args.clip_norm_type = -3
    with pytest.raises(ValueError, match="`clip_norm_type` must be a positive number or 'inf'.*-3"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_max_grad_norm_none_is_accepted_then_named(tmp_path):
    args = grad_args(tmp_path, max_grad_norm=None)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(8))
    with pytest.raises(ValueError, match="`max_grad_norm` must be a number, got None"):
        trainer.train()


def resnet():
    torch.manual_seed(0)
    cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return T.ResNetForImageClassification(cfg)


def wav2vec2_classifier():
    torch.manual_seed(0)
    return T.Wav2Vec2ForSequenceClassification(tiny_wav2vec2_config(classifier_proj_size=8, num_labels=2))


@pytest.mark.parametrize(
    "factory, inputs",
    [
        (resnet, lambda g: {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": 1}),
        (wav2vec2_classifier, lambda g: {"input_values": torch.randn(400, generator=g), "labels": 0}),
    ],
)
def test_models_without_embeddings_train(factory, inputs, tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [inputs(g) for _ in range(8)]
    model = factory()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = grad_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=2)
    trainer = GradTrainer(model=model, args=args, train_dataset=rows, data_collator=T.default_data_collator)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not os.path.exists(os.path.join(args.output_dir, "frozen_parameters.json"))
    # Only an explicit request on a model that lacks embeddings raises, naming the class, before any file exists.
    out = tmp_path / "refused"
    with pytest.raises(LayerStackNotFoundError, match=f"{type(model).__name__} has no input embeddings"):
        GradTrainer(model=factory(), args=grad_args(tmp_path / "refused", freeze_embeddings=True))
    assert not out.exists()


def test_hyperparameter_search_freezes_each_trial_with_its_own_value(tmp_path):
    import optuna  # a test dependency (the test extra)

    frozen_per_trial = []

    class Record(T.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = {
                int(n.split(".")[3]) for n, p in model.named_parameters() if ".layer." in n and not p.requires_grad
            }
            frozen_per_trial.append((args.freeze_first_n_layers, sorted(layers)))

    args = grad_args(tmp_path, max_steps=1, eval_strategy="no")
    trainer = GradTrainer(
        model_init=lambda: tiny_classifier(),
        args=args,
        train_dataset=classification_data(8),
        eval_dataset=classification_data(4),
        callbacks=[Record()],
    )
    values = iter([3, 0, 2])
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"freeze_first_n_layers": trial.suggest_int("freeze_first_n_layers", 0, 3)},
        backend="optuna",
        n_trials=3,
        sampler=optuna.samplers.GridSampler({"freeze_first_n_layers": [3, 0, 2]}),
        compute_objective=lambda metrics: next(values, 0),
    )
    assert sorted(frozen_per_trial) == [(0, []), (2, [0, 1]), (3, [0, 1, 2])]


def test_two_snapshot_callbacks_write_distinct_folders(tmp_path):
    args = grad_args(tmp_path, max_steps=4, grad_snapshot_steps=1)
    l1 = GradSnapshotCallback(every_n_steps=2, norm_type=1.0, name="l1")
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16), callbacks=[l1])
    trainer.add_callback(GradSnapshotCallback(every_n_steps=1, norm_type=2.0))
    trainer.train()
    l2_steps = [s["step"] for s in load_grad_snapshots(args.output_dir)]
    l1_steps = [s["step"] for s in load_grad_snapshots(os.path.join(args.output_dir, "grad_snapshots_l1"))]
    assert l2_steps == [1, 2, 3, 4] and l1_steps == [2, 4]
    assert load_grad_snapshots(os.path.join(args.output_dir, "grad_snapshots_l1"))[0]["norm_type"] == 1.0


def test_two_snapshot_callbacks_on_one_folder_are_refused_before_any_step(tmp_path):
    args = grad_args(tmp_path, max_steps=2)
    callbacks = [GradSnapshotCallback(every_n_steps=1), GradSnapshotCallback(every_n_steps=2, norm_type=1.0)]
    trainer = GradTrainer(
        model=tiny_classifier(), args=args, train_dataset=classification_data(8), callbacks=callbacks
    )
    with pytest.raises(ValueError, match="Two GradSnapshotCallbacks would write the same snapshots"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_tied_output_head_is_reported(tmp_path):
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    args = grad_args(tmp_path, freeze_embeddings=True, max_steps=1)
    ids = torch.randint(3, VOCAB, (4, 8))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    with pytest.warns(UserWarning, match=r"also freezes lm_head\.weight"):
        trainer = GradTrainer(model=model, args=args, train_dataset=rows, data_collator=T.default_data_collator)
    trainer.train()
    with open(os.path.join(args.output_dir, "frozen_parameters.json")) as f:
        description = json.load(f)
    assert description["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert description["frozen_tied"] == ["lm_head.weight"]


def test_t5_keeps_its_shared_relative_bias_trainable():
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(tiny_config("t5"))
    from hf_gradtools import freeze_first_n_layers

    frozen = freeze_first_n_layers(model, 1)
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.requires_grad and not any("relative_attention_bias" in n for n in frozen)
    assert not model.encoder.block[0].layer[0].SelfAttention.q.weight.requires_grad


def test_refusals_touch_neither_the_model_nor_the_disk(tmp_path):
    model = tiny_classifier()
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="only 3 layers"):
        GradTrainer(model=model, args=grad_args(tmp_path / "never", freeze_embeddings=True, freeze_first_n_layers=9))
    assert all(p.requires_grad for p in model.parameters()) and not out.exists()
    # A Trainer refusal after freezing (both `model` and `model_init`) restores the flags too.
    with pytest.raises(ValueError, match="but not both"):
        GradTrainer(
            model=model, model_init=tiny_classifier, args=grad_args(tmp_path / "never", freeze_embeddings=True)
        )
    assert all(p.requires_grad for p in model.parameters())


def test_engine_refusal_comes_from_the_arguments_before_anything():
    from types import SimpleNamespace

    from hf_gradtools.trainer import check_engine_support

    fsdp1 = SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 1}, clip_norm_type=1.0)
    with pytest.raises(ValueError, match="not supported with FSDP1"):
        check_engine_support(fsdp1)
    fsdp2 = SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 2}, clip_norm_type=1.0)
    check_engine_support(fsdp2)  # FSDP2 keeps every tool
    deepspeed = SimpleNamespace(deepspeed="ds.json", grad_snapshot_steps=5)
    with pytest.raises(ValueError, match="not supported with DeepSpeed"):
        check_engine_support(deepspeed)


def test_an_exception_in_train_flushes_and_stops_the_writer(tmp_path):
    class Boom(T.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom")

    args = grad_args(tmp_path, max_steps=6, grad_snapshot_steps=1)
    trainer = GradTrainer(
        model=tiny_classifier(), args=args, train_dataset=classification_data(24), callbacks=[Boom()]
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GradSnapshotCallback))
    assert callback._writer is None and callback._pending == [] and callback._hooks == []
    assert [s["step"] for s in load_grad_snapshots(args.output_dir)] == [1, 2, 3]


def test_grad_seq2seq_trainer_with_generation(tmp_path):
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(tiny_config("t5"))
    rows = [{"input_ids": torch.randint(3, VOCAB, (8,)), "labels": torch.randint(3, VOCAB, (5,))} for _ in range(8)]
    args = GradSeq2SeqTrainingArguments(
        str(tmp_path / "s2s"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        freeze_embeddings=True,
        freeze_first_n_layers=1,
        clip_norm_type=float("inf"),
        max_grad_norm=0.1,
        predict_with_generate=True,
        generation_max_length=6,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    with pytest.warns(UserWarning, match="lm_head.weight"):
        trainer = GradSeq2SeqTrainer(
            model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], data_collator=T.default_data_collator
        )
    trainer.train()
    assert not model.shared.weight.requires_grad
    prediction = trainer.predict(rows[:4], max_length=6)
    assert prediction.predictions.shape[0] == 4  # generated token ids, one row per input


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def test_trl_sft_trainer_with_the_mixin(tmp_path):
    import trl  # a test dependency (the test extra)
    from datasets import Dataset

    from tests.trainer.sft_classes import GradSFTConfig, GradSFTTrainer

    g = torch.Generator().manual_seed(0)
    lengths = [3, 7, 5, 6, 4, 8, 2, 5]
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g)) for n in lengths]
    data = Dataset.from_dict({"text": texts})

    def run(batch, accumulation, trainer_cls=GradSFTTrainer, **extra):
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(tiny_config("llama"))
        grads = []

        class Capture(T.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        settings = dict(
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.0,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            train_sampling_strategy="sequential",
            max_length=16,
            logging_steps=1,
        )
        config = GradSFTConfig(
            str(tmp_path / f"sft-{trainer_cls.__name__}-{batch}-{accumulation}"), **{**settings, **extra}
        )
        trainer = trainer_cls(
            model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer(), callbacks=[Capture()]
        )
        trainer.train()
        return trainer, grads[0]

    def relative(a, b):
        return (sum(float((a[n] - b[n]).norm() ** 2) for n in a) / sum(float(b[n].norm() ** 2) for n in a)) ** 0.5

    frozen = dict(freeze_embeddings=True, freeze_first_n_layers=1, max_grad_norm=0.0)
    _, big = run(8, 1, **frozen)
    _, small = run(2, 4, **frozen)
    _, plain_small = run(2, 4, **frozen, trainer_cls=trl.SFTTrainer)
    assert "model.embed_tokens.weight" not in big and not any(".layers.0." in n for n in big)
    # SFTTrainer already normalises by the window's token count (Llama has `loss_type`): the same gradient
    # (plain SFTTrainer does not freeze; freezing leaves the other parameters' gradients as they are).
    assert relative(small, plain_small) < 1e-6
    # SFT's fused LM head differs between batch shapes by ~1e-3 on its own (plain SFTTrainer 8x1 vs 2x4 too).
    assert relative(small, big) < 2e-3
    clipped, _ = run(2, 4, max_grad_norm=1e-3, clip_norm_type=float("inf"), learning_rate=1e-3)
    assert clipped.state.log_history[0]["grad_norm"] > 1e-3


def test_probe_failure_keeps_the_trainers_scaling_and_says_so(tmp_path, caplog):
    """A loss no rule describes (here the batch's max) keeps the Trainer's own scaling, with one log line."""

    class MaxLoss(GradTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none").max()
            return (loss, None) if return_outputs else loss

    args = grad_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        MaxLoss(model=tiny_classifier(), args=args, train_dataset=classification_data(8)).train()
    assert caplog.text.count("could not establish how the loss") == 1


class GradCapture(T.TrainerCallback):
    """Copies every gradient right before each optimizer step, by parameter name."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def test_default_grad_seq2seq_trainer_is_the_seq2seq_trainer(tmp_path):
    """Side by side with every new field at its default: same callbacks, files, logs and parameters."""
    rows = [{"input_ids": torch.randint(3, VOCAB, (8,)), "labels": torch.randint(3, VOCAB, (5,))} for _ in range(8)]
    trainers = {}
    for name, cls in (("plain", T.Seq2SeqTrainer), ("grad", GradSeq2SeqTrainer)):
        torch.manual_seed(0)
        args = T.Seq2SeqTrainingArguments(str(tmp_path / name), **COMMON)
        trainers[name] = cls(
            model=T.T5ForConditionalGeneration(tiny_config("t5")),
            args=args,
            train_dataset=rows,
            data_collator=T.default_data_collator,
        )
        assert trainers[name].args is args
        trainers[name].train()
    assert_same_run(trainers["plain"], trainers["grad"], tmp_path / "plain", tmp_path / "grad")


def test_default_grad_sft_trainer_is_the_sft_trainer(tmp_path):
    """TRL's SFTTrainer with the mixin, every new field at its default, side by side with SFTTrainer itself,
    with accumulation (SFTTrainer's own is exact for Llama: its loss takes the item count)."""
    import trl
    from datasets import Dataset

    from tests.trainer.sft_classes import GradSFTTrainer

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g)) for n in (3, 7, 5, 6)]
    data = Dataset.from_dict({"text": texts * 2})
    trainers = {}
    for name, cls in (("plain", trl.SFTTrainer), ("grad", GradSFTTrainer)):
        torch.manual_seed(0)
        settings = {**COMMON, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2}
        args = trl.SFTConfig(str(tmp_path / name), max_length=16, **settings)
        trainers[name] = cls(
            model=T.LlamaForCausalLM(tiny_config("llama")), args=args, train_dataset=data,
            processing_class=tiny_tokenizer(),
        )  # fmt: skip
        assert trainers[name].args is args
        trainers[name].train()
    assert_same_run(trainers["plain"], trainers["grad"], tmp_path / "plain", tmp_path / "grad")


class TargetModel(torch.nn.Module):
    """A custom model whose labels are called `target` (the Trainer's `label_names`): a per-token mean loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.out = torch.nn.Linear(8, 5)

    def forward(self, input_ids, target=None):
        logits = self.out(self.embed(input_ids))
        return {"loss": torch.nn.functional.cross_entropy(logits.reshape(-1, 5), target.reshape(-1)), "logits": logits}


@pytest.mark.parametrize("normalization", ["auto", "token"])
def test_labels_under_another_name(tmp_path, normalization, caplog):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (4, 6), generator=g)
    target = torch.randint(0, 5, (4, 6), generator=g)
    for row, start in enumerate([0, 5, 2, 4]):
        target[row, :start] = -100
    rows = [{"input_ids": i, "target": t} for i, t in zip(ids, target, strict=True)]
    model = TargetModel()
    expected = torch.autograd.grad(model(ids, target)["loss"], list(model.parameters()))
    capture = GradCapture()

    args = grad_args(
        tmp_path,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        max_steps=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
        label_names=["target"],
        loss_normalization=normalization,
        remove_unused_columns=False,
    )
    trainer = GradTrainer(
        model=TargetModel(),
        args=args,
        train_dataset=rows,
        data_collator=T.default_data_collator,
        callbacks=[capture],
    )
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        trainer.train()
    assert "could not establish" not in caplog.text
    for got, want in zip(capture.grads[0].values(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_whisper_decoder_inputs_come_from_its_own_shift(tmp_path, caplog):
    cfg = T.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        decoder_start_token_id=1,
        eos_token_id=2,
        bos_token_id=1,
        dropout=0.0,
    )
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, VOCAB, (4, 6), generator=g)
    for row, length in enumerate([6, 2, 4, 3]):
        labels[row, length:] = -100
    batch = {"input_features": torch.randn(4, 8, 16, generator=g), "labels": labels}
    torch.manual_seed(0)
    model = T.WhisperForConditionalGeneration(cfg)
    model.train()
    expected = {
        n: g_
        for n, g_ in zip(
            [n for n, p in model.named_parameters() if p.requires_grad],
            torch.autograd.grad(model(**batch).loss, [p for p in model.parameters() if p.requires_grad]),
            strict=True,
        )
    }
    capture = GradCapture()

    args = GradSeq2SeqTrainingArguments(
        str(tmp_path / "whisper"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
    )
    torch.manual_seed(0)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    trainer = GradSeq2SeqTrainer(
        model=T.WhisperForConditionalGeneration(cfg),
        args=args,
        train_dataset=rows,
        data_collator=T.default_data_collator,
        callbacks=[capture],
    )
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        trainer.train()
    assert "could not establish" not in caplog.text
    grads = capture.grads
    num = sum(float((grads[0][n] - expected[n]).norm() ** 2) for n in expected) ** 0.5
    assert num / sum(float(expected[n].norm() ** 2) for n in expected) ** 0.5 < 1e-5


def test_freeze_fields_changed_after_construction_are_applied_or_refused(tmp_path):
    args = grad_args(tmp_path, max_steps=1)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(8))
    args.freeze_embeddings = True
    trainer.train()
    assert not trainer.model.bert.embeddings.word_embeddings.weight.requires_grad
    args.freeze_embeddings = False
    with pytest.raises(ValueError, match="cannot be thawed"):
        trainer.train()


def test_mixin_listed_after_the_trainer_is_refused():
    with pytest.raises(TypeError, match="lists a Trainer class before GradTrainerMixin"):

        class Wrong(T.Trainer, GradTrainerMixin):
            pass


def test_gradual_unfreezing_of_a_model_frozen_before_the_trainer(tmp_path):
    """The GLUE example freezes the model itself before building the trainer: the unfreezing plan still holds."""
    from hf_gradtools.trainer import apply_freezing

    args = grad_args(tmp_path, max_steps=4, freeze_embeddings=True, freeze_first_n_layers=2, gradual_unfreeze_steps=2)
    model = tiny_classifier()
    apply_freezing(model, args)
    trainer = GradTrainer(model=model, args=args, train_dataset=classification_data(16))
    trainer.train()
    assert [h["unfrozen_blocks"] for h in trainer.state.log_history if "unfrozen_blocks" in h][-1] == 2
    assert model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
