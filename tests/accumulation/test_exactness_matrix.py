"""Accumulation against one big batch, head by head: GradTrainer and the plain Trainer side by side.

Each row trains one step (learning rate 0, no clipping) on the same rows, once as one batch of 4 and once as
micro-batches accumulated, and compares the accumulated gradient with the gradient of the loss of the one big
batch, computed by hand. GradTrainer must be exact (1e-5), or keep the Trainer's own scaling and say so in one log
line; the plain Trainer's error is measured alongside (it is allowed to be wrong: that is what GradTrainer fixes).
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T

from hf_gradtools import GradSeq2SeqTrainer, GradSeq2SeqTrainingArguments, GradTrainer, GradTrainingArguments
from tests.conftest import VOCAB, tiny_config, tiny_wav2vec2_config

ROWS = 4
FALLBACK = "could not establish how the loss"


def ids(rows=ROWS, seq=8, seed=0, low=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (rows, seq), generator=g)


def masked_labels(tokens, keep_from, seed=1):
    """Labels equal to the tokens, with a different number of -100 per row (row i keeps positions >= keep_from[i])."""
    labels = tokens.clone()
    for i, start in enumerate(keep_from):
        labels[i, :start] = -100
    return labels


def rows_of(batch: dict) -> list[dict]:
    n = next(v.shape[0] for v in batch.values())
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def bert_cfg(**kw):
    cfg = tiny_config("bert")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def seeded(factory):
    def make():
        torch.manual_seed(0)
        return factory()

    return make


def wav2vec2(reduction):
    return T.Wav2Vec2ForCTC(tiny_wav2vec2_config(ctc_loss_reduction=reduction))


def segformer():
    cfg = T.SegformerConfig(
        num_channels=3,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 2],
        decoder_hidden_size=16,
        num_labels=3,
        mlp_ratios=[2, 2],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    model = T.SegformerForSemanticSegmentation(cfg)
    # Batch statistics mix the rows of a batch: no accumulation can equal one batch through BatchNorm.
    model.decode_head.batch_norm = torch.nn.Identity()
    return model


def llama_lora():
    peft = pytest.importorskip("peft")
    model = T.LlamaForCausalLM(tiny_config("llama"))
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def case_rows():
    g = torch.Generator().manual_seed(3)
    tok = ids()
    lm = masked_labels(tok, [0, 3, 5, 1])
    rows = {
        "bert-sequence-classification": (
            seeded(lambda: T.BertForSequenceClassification(bert_cfg(num_labels=2))),
            {"input_ids": tok, "labels": torch.tensor([0, 1, 1, 0])},
        ),
        "bert-regression": (
            seeded(lambda: T.BertForSequenceClassification(bert_cfg(num_labels=1))),
            {"input_ids": tok, "labels": torch.randn(ROWS, generator=g)},
        ),
        "bert-multi-label": (
            seeded(
                lambda: T.BertForSequenceClassification(
                    bert_cfg(num_labels=3, problem_type="multi_label_classification")
                )
            ),
            {"input_ids": tok, "labels": torch.randint(0, 2, (ROWS, 3), generator=g).float()},
        ),
        "bert-token-classification": (
            seeded(lambda: T.BertForTokenClassification(bert_cfg(num_labels=3))),
            {"input_ids": tok, "labels": masked_labels(torch.randint(0, 3, (ROWS, 8), generator=g), [0, 6, 2, 4])},
        ),
        "bert-multiple-choice": (
            seeded(lambda: T.BertForMultipleChoice(bert_cfg())),
            {"input_ids": ids(rows=ROWS * 2).reshape(ROWS, 2, 8), "labels": torch.tensor([0, 1, 1, 0])},
        ),
        "bert-question-answering": (
            seeded(lambda: T.BertForQuestionAnswering(bert_cfg())),
            {
                "input_ids": tok,
                "start_positions": torch.tensor([1, 2, 0, 5]),
                "end_positions": torch.tensor([3, 4, 6, 7]),
            },
        ),
        "bert-masked-lm": (
            seeded(lambda: T.BertForMaskedLM(bert_cfg())),
            {"input_ids": tok, "labels": masked_labels(tok, [7, 2, 5, 6])},
        ),
        "gpt2-causal-lm": (seeded(lambda: T.GPT2LMHeadModel(tiny_config("gpt2"))), {"input_ids": tok, "labels": lm}),
        "llama-causal-lm": (
            seeded(lambda: T.LlamaForCausalLM(tiny_config("llama"))),
            {"input_ids": tok, "labels": lm},
        ),
        "llama-lora": (seeded(llama_lora), {"input_ids": tok, "labels": lm}),
        "bart-for-causal-lm": (
            seeded(lambda: T.BartForCausalLM(tiny_config("bart"))),
            {"input_ids": tok, "labels": lm},
        ),
        "wav2vec2-ctc-sum": (
            seeded(lambda: wav2vec2("sum")),
            {"input_values": torch.randn(ROWS, 400, generator=g), "labels": masked_ctc_labels(g)},
        ),
        "wav2vec2-ctc-mean": (
            seeded(lambda: wav2vec2("mean")),
            {"input_values": torch.randn(ROWS, 400, generator=g), "labels": masked_ctc_labels(g)},
        ),
        "segformer-ignore-255": (
            seeded(segformer),
            {"pixel_values": torch.randn(ROWS, 3, 16, 16, generator=g), "labels": seg_labels(g)},
        ),
    }
    return rows


def masked_ctc_labels(g):
    labels = torch.randint(1, 12, (ROWS, 6), generator=g)
    for i, length in enumerate([6, 2, 4, 3]):
        labels[i, length:] = -100
    return labels


def seg_labels(g):
    labels = torch.randint(0, 3, (ROWS, 16, 16), generator=g)
    ignore = torch.rand(ROWS, 16, 16, generator=g) < torch.tensor([0.1, 0.6, 0.3, 0.8]).view(ROWS, 1, 1)
    labels[ignore] = 255
    return labels


CASES = case_rows()


class GradCapture(T.TrainerCallback):
    """Copies every gradient right before each optimizer step, and keeps every logged training loss."""

    def __init__(self):
        self.steps, self.losses = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}):
            self.losses.append(logs["loss"])


def train_steps(
    trainer_cls, args_cls, model, rows, batch, accumulation, tmp_path, collator=None, trainer_kw=None, steps=1, **extra
):
    """`GradCapture` of the first `steps` optimizer steps (learning rate 0, no clipping, one log per step)."""
    capture = GradCapture()
    args = args_cls(
        output_dir=str(tmp_path / f"{trainer_cls.__name__}-{batch}x{accumulation}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        logging_steps=1,
        **extra,
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=collator or T.default_data_collator,
        callbacks=[capture],
        **(trainer_kw or {}),
    )
    trainer.train()
    return capture


def train_one_step(trainer_cls, args_cls, model, rows, batch, accumulation, tmp_path, collator=None, **extra):
    return train_steps(trainer_cls, args_cls, model, rows, batch, accumulation, tmp_path, collator, **extra).steps[0]


def reference(model, batch: dict, loss_fn=None):
    model.train()
    model.zero_grad()
    output = model(**batch)
    (loss_fn(output, batch) if loss_fn else output.loss).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(grads, expected):
    num = sum(float((grads[n] - expected[n]).norm() ** 2) for n in expected) ** 0.5
    den = sum(float(expected[n].norm() ** 2) for n in expected) ** 0.5
    return num / den


def check_row(name, grad, plain, expected, log_text):
    """GradTrainer exact to 1e-5, or fell back with its log line and equals the plain Trainer."""
    error = relative_error(grad, expected)
    trainer_error = relative_error(plain, expected)
    if FALLBACK in log_text:
        assert relative_error(grad, plain) < 1e-6, f"{name}: fell back but differs from the Trainer"
    else:
        assert error < 1e-5, f"{name}: GradTrainer error {error:.2e} (Trainer {trainer_error:.2e})"
    return error, trainer_error


@pytest.mark.parametrize("name", list(CASES))
def test_accumulation_matches_one_big_batch(name, tmp_path, caplog):
    factory, batch = CASES[name]
    rows = rows_of(batch)
    expected = reference(factory(), batch)
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        grad = train_one_step(GradTrainer, GradTrainingArguments, factory(), rows, 1, ROWS, tmp_path)
    plain = train_one_step(T.Trainer, T.TrainingArguments, factory(), rows, 1, ROWS, tmp_path)
    error, trainer_error = check_row(name, grad, plain, expected, caplog.text)
    print(f"{name}: GradTrainer {error:.1e}, Trainer {trainer_error:.1e}")


def test_rows_that_must_be_exact_are(tmp_path, caplog):
    """The standard heads never fall back: their normalisation is measured, not guessed."""
    for name in [
        "bert-sequence-classification",
        "bert-masked-lm",
        "gpt2-causal-lm",
        "wav2vec2-ctc-mean",
        "wav2vec2-ctc-sum",
        "segformer-ignore-255",
        "bart-for-causal-lm",
    ]:
        factory, batch = CASES[name]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_gradtools"):
            grad = train_one_step(GradTrainer, GradTrainingArguments, factory(), rows_of(batch), 2, 2, tmp_path)
        assert FALLBACK not in caplog.text, name
        assert relative_error(grad, reference(factory(), batch)) < 1e-5, name


def test_label_smoothing(tmp_path):
    factory, batch = CASES["bert-sequence-classification"]
    smoother = T.trainer_pt_utils.LabelSmoother(epsilon=0.1)
    expected = reference(factory(), batch, lambda out, b: smoother(out, b["labels"]))
    grad = train_one_step(
        GradTrainer, GradTrainingArguments, factory(), rows_of(batch), 1, ROWS, tmp_path, label_smoothing_factor=0.1
    )
    assert relative_error(grad, expected) < 1e-5


class OwnLossTrainer(GradTrainer):
    """A subclass that computes its own per-sample mean loss and never calls `super().compute_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


def test_compute_loss_override_without_super(tmp_path):
    factory, batch = CASES["bert-sequence-classification"]
    expected = reference(factory(), batch)
    grad = train_one_step(OwnLossTrainer, GradTrainingArguments, factory(), rows_of(batch), 1, ROWS, tmp_path)
    assert relative_error(grad, expected) < 1e-5  # never multiplied by the accumulation steps


def test_instance_level_opt_out_keeps_the_trainers_scaling(tmp_path):
    factory, batch = CASES["bert-sequence-classification"]
    rows = rows_of(batch)

    class OptOut(GradTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.loss_is_scaled_for_ga = False  # "my loss is a per-batch mean: divide it by N"

    grad = train_one_step(OptOut, GradTrainingArguments, factory(), rows, 1, ROWS, tmp_path)
    expected = reference(factory(), batch)
    # The Trainer divides each micro-batch mean by 4: with equal micro-batches that is the big-batch gradient.
    assert relative_error(grad, expected) < 1e-5


def test_declared_normalization_is_used_without_measuring(tmp_path, caplog):
    factory, batch = CASES["wav2vec2-ctc-sum"]
    expected = reference(factory(), batch)
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        grad = train_one_step(
            GradTrainer, GradTrainingArguments, factory(), rows_of(batch), 1, ROWS, tmp_path, loss_normalization="sum"
        )
    assert "measured" not in caplog.text
    assert relative_error(grad, expected) < 1e-5


def test_packed_rows_with_flattening_collator(tmp_path, caplog):
    """Packed rows (`DataCollatorWithFlattening`): Llama's loss takes `num_items_in_batch`, so the Trainer's count
    (shifted labels) is already exact here; GradTrainer must give the same gradient, measured or fallen back."""
    collator = T.DataCollatorWithFlattening()
    tok, lm = ids(), masked_labels(ids(), [0, 3, 5, 1])
    rows = [{"input_ids": tok[i].tolist(), "labels": lm[i].tolist()} for i in range(ROWS)]
    factory = seeded(lambda: T.LlamaForCausalLM(tiny_config("llama")))
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        grad = train_one_step(GradTrainer, GradTrainingArguments, factory(), rows, 2, 2, tmp_path, collator=collator)
    plain = train_one_step(T.Trainer, T.TrainingArguments, factory(), rows, 2, 2, tmp_path, collator=collator)
    assert relative_error(grad, plain) < 1e-5


def seq2seq_case(arch):
    cfg = tiny_config(arch)
    model_cls = T.T5ForConditionalGeneration if arch == "t5" else T.BartForConditionalGeneration
    labels = masked_labels(ids(seq=6, seed=5), [0, 2, 4, 1])
    return seeded(lambda: model_cls(cfg)), {"input_ids": ids(seed=4), "labels": labels}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_through_grad_seq2seq_trainer(arch, tmp_path, caplog):
    factory, batch = seq2seq_case(arch)
    expected = reference(factory(), batch)
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        grad = train_one_step(
            GradSeq2SeqTrainer, GradSeq2SeqTrainingArguments, factory(), rows_of(batch), 1, ROWS, tmp_path
        )
    plain = train_one_step(T.Seq2SeqTrainer, T.Seq2SeqTrainingArguments, factory(), rows_of(batch), 1, ROWS, tmp_path)
    check_row(arch, grad, plain, expected, caplog.text)
    assert FALLBACK not in caplog.text


def test_a_shifted_token_rule_declared_for_one_label_a_row_is_refused(tmp_path):
    """The shift would drop the first row's label: refused before the first step, naming the field."""
    factory, batch = CASES["bert-sequence-classification"]
    with pytest.raises(ValueError, match="`loss_normalization`='shifted_token' .* the labels are one per row"):
        train_one_step(
            GradTrainer,
            GradTrainingArguments,
            factory(),
            rows_of(batch),
            1,
            ROWS,
            tmp_path,
            loss_normalization="shifted_token",
        )
