"""Accumulation side by side with the plain Trainer, against the gradient of the same rows as one batch.

The cases where a measured rule can go wrong: a loss that takes `num_items_in_batch`, one-row micro-batches of
different lengths, rules that tie on the first window, a loss with a part that does not split over micro-batches.
Each run trains with learning rate 0 and no clipping, and every optimizer step's accumulated gradient is compared
with the gradient of that step's rows as one batch, computed by hand. GradTrainer is never further from it than the
Trainer, and a log line that says "exactly" is exact to 1e-5.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from hf_gradtools import GradTrainer, GradTrainingArguments
from tests.accumulation.test_exactness_matrix import reference, relative_error, seeded, train_steps
from tests.conftest import VOCAB, tiny_config

FALLBACK = "could not establish how the loss"
DDP_WORKER = os.path.join(os.path.dirname(__file__), "..", "helpers", "ddp_count.py")


def pad(rows: list[dict]) -> dict:
    """Dynamic padding: every tensor of the batch padded on the right to its longest row (labels with -100)."""
    longest = max(len(row["input_ids"]) for row in rows)
    batch = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        batch[key] = torch.stack([F.pad(row[key], (0, longest - len(row[key])), value=fill) for row in rows])
    return batch


def lm_rows(lengths, starts, seed=0) -> list[dict]:
    """Causal LM rows of the given lengths; row i labels the positions from `starts[i]` on."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, start in zip(lengths, starts, strict=True):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[:start] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def train(trainer_cls, factory, rows, batch, accumulation, tmp_path, collator=pad, trainer_kw=None, **extra):
    """Per optimizer step of one epoch over `rows`, the accumulated gradient (`GradCapture.steps`)."""
    args_cls = GradTrainingArguments if issubclass(trainer_cls, GradTrainer) else T.TrainingArguments
    steps = len(rows) // (batch * accumulation)
    capture = train_steps(
        trainer_cls, args_cls, factory(), rows, batch, accumulation, tmp_path, collator, trainer_kw, steps, **extra
    )
    return capture.steps


def one_batch_grads(factory, rows, window, loss_fn=None) -> list[dict]:
    """The gradient of each window of `window` rows as one batch; `loss_fn(outputs, batch)` its loss (the model's
    own when `None`)."""
    model = factory()
    return [reference(model, pad(rows[start : start + window]), loss_fn) for start in range(0, len(rows), window)]


def side_by_side(
    factory, rows, batch, accumulation, tmp_path, caplog, loss_fn=None, trainer_kw=None, collator=pad, **extra
):
    """GradTrainer's and the Trainer's error per step; asserts GradTrainer is never further and "exactly" is exact."""
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        grad = train(GradTrainer, factory, rows, batch, accumulation, tmp_path, collator, trainer_kw, **extra)
    log = caplog.text
    plain = train(T.Trainer, factory, rows, batch, accumulation, tmp_path, collator, trainer_kw)
    expected = one_batch_grads(factory, rows, batch * accumulation, loss_fn)
    ours = [relative_error(g, e) for g, e in zip(grad, expected, strict=True)]
    theirs = [relative_error(g, e) for g, e in zip(plain, expected, strict=True)]
    print(f"GradTrainer {[f'{e:.1e}' for e in ours]}, Trainer {[f'{e:.1e}' for e in theirs]}")
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a <= b * (1 + 1e-3) + 1e-6, f"step {step + 1}: GradTrainer {a:.2e}, Trainer {b:.2e}"
    if "exactly" in log:
        assert max(ours) < 1e-5, log
    return ours, theirs, log


# ---- a loss that takes `num_items_in_batch` ----

llama = seeded(lambda: T.LlamaForCausalLM(tiny_config("llama")))


def summed_token_loss(outputs, labels, num_items_in_batch=None):
    """The Trainer's contract: the sum over the (shifted) target tokens, divided by `num_items_in_batch` if given."""
    logits, targets = outputs.logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def summed_loss_of_window(outputs, batch):
    return summed_token_loss(outputs, batch["labels"], batch["labels"][:, 1:].ne(-100).sum())


class SummedLossTrainer(GradTrainer):
    """A `compute_loss` override written against the Trainer's contract."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = summed_token_loss(outputs, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


ROWS = lm_rows([12] * 8, [0, 3, 5, 1, 7, 2, 0, 4])


@pytest.mark.parametrize("batch, accumulation", [(8, 1), (2, 4)])
def test_compute_loss_func_gets_the_trainers_count(batch, accumulation, tmp_path, caplog):
    kw = {"compute_loss_func": summed_token_loss}
    ours, theirs, log = side_by_side(llama, ROWS, batch, accumulation, tmp_path, caplog, summed_loss_of_window, kw)
    assert max(ours) < 1e-5 and FALLBACK not in log
    assert ("exactly" in log) == (accumulation > 1)  # one micro-batch a step has nothing to add up, or to measure
    # The logged loss is the one batch's too.
    with torch.no_grad():
        expected = float(summed_loss_of_window(llama()(**pad(ROWS)), pad(ROWS)))
    logged = train_steps(GradTrainer, GradTrainingArguments, llama(), ROWS, batch, accumulation, tmp_path, pad, kw)
    assert logged.losses == pytest.approx([expected], rel=1e-5)


def test_compute_loss_override_gets_the_trainers_count(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        for batch, accumulation in [(8, 1), (2, 4)]:
            grads = train(SummedLossTrainer, llama, ROWS, batch, accumulation, tmp_path)
            expected = one_batch_grads(llama, ROWS, 8, summed_loss_of_window)
            assert relative_error(grads[0], expected[0]) < 1e-5, (batch, accumulation)
    assert FALLBACK not in caplog.text


@pytest.mark.parametrize("declared, divisor", [("sample", "rows"), ("token", "tokens")])
def test_a_declared_rule_gives_a_count_of_its_own_items(declared, divisor, tmp_path):
    """Declared `sample` for a loss that divides by the count: the summed token losses over the window's rows,
    whatever the micro-batches (`token` counts every label, position 0 too: that is what was declared)."""

    def loss_fn(outputs, batch):
        labels = batch["labels"]
        return summed_token_loss(outputs, labels, len(labels) if divisor == "rows" else labels.ne(-100).sum())

    expected = one_batch_grads(llama, ROWS, 8, loss_fn)
    for batch, accumulation in [(8, 1), (2, 4), (1, 8)]:
        grads = train(
            GradTrainer,
            llama,
            ROWS,
            batch,
            accumulation,
            tmp_path,
            trainer_kw={"compute_loss_func": summed_token_loss},
            loss_normalization=declared,
        )
        assert relative_error(grads[0], expected[0]) < 1e-5, (batch, accumulation)


# ---- one-row micro-batches of different lengths ----


class TinyLM(nn.Module):
    """Embedding and output layer; the loss is each row's mean token loss, averaged over rows or summed."""

    def __init__(self, reduction: str):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.out = nn.Linear(8, VOCAB)
        self.reduction = reduction
        # The Trainer divides a mean by the accumulation steps, and leaves a sum that takes loss kwargs as it is:
        # both are exact for one-row micro-batches, so the Trainer is the bar here.
        self.accepts_loss_kwargs = reduction == "sum"

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.out(self.embed(input_ids))
        token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        per_row = token.sum(1) / labels.ne(-100).sum(1)
        return CausalLMOutput(loss=per_row.mean() if self.reduction == "sample" else per_row.sum(), logits=logits)


UNEVEN = lm_rows([5, 9, 3, 7, 6, 4, 8, 2], [0, 2, 1, 0, 3, 0, 2, 1], seed=1)


@pytest.mark.parametrize("reduction", ["sample", "sum"])
def test_one_row_micro_batches_of_different_lengths(reduction, tmp_path, caplog):
    """Two one-row micro-batches padded by the data collator into one batch of two rows test every rule."""
    ours, theirs, log = side_by_side(lambda: TinyLM(reduction), UNEVEN, 1, 4, tmp_path, caplog)
    assert max(ours) < 1e-5 and FALLBACK not in log and "exactly" in log


def pad_rows_with_ids(rows: list[dict]) -> dict:
    """`pad`, for dataset rows that carry a `row_id` it leaves out of the batch: rows of a batch cannot be collated
    again."""
    if not all("row_id" in row for row in rows):
        raise KeyError("row_id")
    return pad([{key: value for key, value in row.items() if key != "row_id"} for row in rows])


UNEVEN_WITH_IDS = [{**row, "row_id": i} for i, row in enumerate(UNEVEN)]


@pytest.mark.parametrize("reduction", ["sample", "sum"])
def test_one_row_micro_batches_the_collator_cannot_join(reduction, tmp_path, caplog):
    """Unjoined, only the token rules can be tested on one row, and the untested ones would weight the rows
    differently: the Trainer's scaling, said at the first window."""
    ours, theirs, log = side_by_side(
        lambda: TinyLM(reduction), UNEVEN_WITH_IDS, 1, 4, tmp_path, caplog, collator=pad_rows_with_ids
    )
    assert max(ours) < 1e-5
    assert log.count(FALLBACK) == 1 and "from the first window" in log


def test_a_one_step_run_says_it_keeps_the_trainers_scaling(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        train(GradTrainer, lambda: TinyLM("sample"), UNEVEN_WITH_IDS[:4], 1, 4, tmp_path, collator=pad_rows_with_ids)
    assert caplog.text.count(FALLBACK) == 1
    assert "each micro-batch loss divided by 4" in caplog.text


def pad_sentences(rows: list[dict]) -> dict:
    """Dynamic padding of classification rows (one label a row)."""
    longest = max(len(row["input_ids"]) for row in rows)
    ids = torch.stack([F.pad(row["input_ids"], (0, longest - len(row["input_ids"]))) for row in rows])
    return {
        "input_ids": ids,
        "attention_mask": ids.ne(0).long(),
        "labels": torch.stack([row["labels"] for row in rows]),
    }


def sentence_rows(n: int = 8, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    return [
        {"input_ids": torch.randint(3, VOCAB, (length,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
        for length in lengths
    ]


bert_classifier = seeded(lambda: T.BertForSequenceClassification(tiny_config("bert")))


def test_one_row_sentences_of_a_bert_classifier(tmp_path, caplog):
    """BERT's `forward` takes `**kwargs`, so the Trainer passes it a count it ignores and adds the micro-batch
    losses undivided: 4 times one batch's gradient. Joined by the collator, the rows tell the rule: exact."""
    rows = sentence_rows()

    def loss_fn(outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"])

    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        grad = train(GradTrainer, bert_classifier, rows, 1, 4, tmp_path, collator=pad_sentences)
        plain = train(T.Trainer, bert_classifier, rows, 1, 4, tmp_path, collator=pad_sentences)
    model = bert_classifier()
    expected = [reference(model, pad_sentences(rows[i : i + 4]), loss_fn) for i in (0, 4)]
    ours = [relative_error(g, e) for g, e in zip(grad, expected, strict=True)]
    theirs = [relative_error(g, e) for g, e in zip(plain, expected, strict=True)]
    print(f"GradTrainer {[f'{e:.1e}' for e in ours]}, Trainer {[f'{e:.1e}' for e in theirs]}")
    assert max(ours) < 1e-5 and "exactly" in caplog.text and FALLBACK not in caplog.text
    assert min(theirs) == pytest.approx(3.0, rel=1e-4)  # the sum of 4 means: 4 times the mean's gradient


def test_a_kept_trainer_scaling_says_what_it_does(tmp_path, caplog):
    """Where the collator cannot join the rows, the Trainer's scaling is kept, and the warning says it is 4 times
    one batch's gradient for this loss."""
    rows = [{**row, "row_id": i} for i, row in enumerate(sentence_rows())]

    def collate(rows):
        if not all("row_id" in row for row in rows):
            raise KeyError("row_id")
        return pad_sentences(rows)

    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        train(GradTrainer, bert_classifier, rows, 1, 4, tmp_path, collator=collate)
    assert FALLBACK in caplog.text
    assert "which this loss ignores" in caplog.text and "about 4 times one batch's" in caplog.text


def test_one_row_micro_batches_with_a_loss_that_takes_the_count(tmp_path, caplog):
    """The count needs no rule: exact on one-row micro-batches too, without falling back."""
    ours, _, log = side_by_side(
        llama,
        UNEVEN,
        1,
        4,
        tmp_path,
        caplog,
        summed_loss_of_window,
        trainer_kw={"compute_loss_func": summed_token_loss},
    )
    assert max(ours) < 1e-5 and FALLBACK not in log


# ---- rules that tie on the first window ----


def bert_config(**overrides):
    config = tiny_config("bert")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def token_rows(first_labelled_from: int) -> list[dict]:
    """Token-classification rows of length 6; rows 0-3 never label position 0, rows 4-7 do from the given row on."""
    g = torch.Generator().manual_seed(4)
    rows = []
    for i in range(8):
        ids = torch.randint(3, VOCAB, (6,), generator=g)
        labels = torch.randint(0, 3, (6,), generator=g)
        labels[: 1 + i % 3] = -100
        if i >= first_labelled_from:
            labels[0] = int(torch.randint(0, 3, (1,), generator=g))
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


class ShiftedMeanTrainer(GradTrainer):
    """A shifted causal-LM mean that ignores `num_items_in_batch`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = shifted_mean(outputs, labels)
        return (loss, outputs) if return_outputs else loss


def shifted_mean(outputs, labels):
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def test_rules_that_tie_on_the_first_window(tmp_path, caplog):
    """No row of the first window labels position 0, some of the second do: the shifted and the unshifted token
    rules weight the first alike and the second differently. Each head is weighted by its own, at both steps."""
    bert = seeded(lambda: T.BertForTokenClassification(bert_config(num_labels=3)))
    ours, theirs, log = side_by_side(bert, token_rows(4), 2, 2, tmp_path, caplog)
    assert max(ours) < 1e-5 and "per token," in log

    # Rows of the first micro-batch with as many targets each: token and sample rules weight its halves alike.
    for rows in (lm_rows([8] * 8, [1, 2, 3, 1, 0, 2, 0, 1]), [ROWS[i] for i in (6, 0, 3, 7)]):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_gradtools"):
            grads = train(ShiftedMeanTrainer, llama, rows, 2, 2, tmp_path)
        expected = one_batch_grads(llama, rows, 4, lambda outputs, batch: shifted_mean(outputs, batch["labels"]))
        assert all(relative_error(g, e) < 1e-5 for g, e in zip(grads, expected, strict=True))
        assert "per shifted_token," in caplog.text


# ---- a part of the loss that does not split: an MoE router's auxiliary loss ----


def mixtral():
    torch.manual_seed(0)
    config = T.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=1,
        output_router_logits=True,
        router_aux_loss_coef=0.1,
        pad_token_id=0,
        max_position_embeddings=64,
    )
    return T.MixtralForCausalLM(config)


def test_a_router_auxiliary_loss_is_not_exact(tmp_path, caplog):
    """The auxiliary loss of the whole batch is not a weighted sum of the parts': not exact, and not said to be."""
    ours, theirs, log = side_by_side(mixtral, ROWS, 2, 4, tmp_path, caplog)
    assert "within" in log and "exactly" not in log
    assert ours[0] < theirs[0]


# ---- two processes ----


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_pass_the_trainers_count(tmp_path):
    out = tmp_path / "grads.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", DDP_WORKER]
    done = subprocess.run([*command, str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    grads = torch.load(out)
    expected = one_batch_grads(llama, ROWS, 8, summed_loss_of_window)[0]
    assert relative_error(grads["GradTrainer"], expected) < 1e-5
    assert relative_error(grads["Trainer"], expected) < 1e-5


def test_a_first_window_without_labels_is_measured_again_on_the_next(tmp_path, caplog):
    """Nothing in the first window is labelled (its loss is NaN, skipped by the non-finite guard): it settles
    nothing, so the second window is measured, and from there on the accumulation is exact."""
    rows = lm_rows([5, 7, 4, 6, 8, 5, 7, 6, 4, 8, 6, 5], [9, 9, 9, 9, 1, 2, 3, 1, 0, 2, 4, 1])  # 4 first: no label
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        grads = train(ShiftedMeanTrainer, llama, rows, 2, 2, tmp_path, skip_nonfinite_grads=True)
    expected = one_batch_grads(llama, rows, 4, lambda outputs, batch: shifted_mean(outputs, batch["labels"]))
    assert "the next ones are measured again" in caplog.text
    assert "normalised per shifted_token, measured on window 2" in caplog.text
    assert all(relative_error(g, e) < 1e-5 for g, e in zip(grads[1:], expected[1:], strict=True))
