"""Snapshots hold the gradients computed by hand; frozen_parameters.json holds the documented content."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers as T

from hf_gradtools import GradSnapshotCallback, GradTrainer, load_grad_snapshots
from tests.conftest import classification_data, tiny_classifier


def hand_norms(data, rows, norm_type):
    """Per-parameter norms of the mean-loss gradient over `rows`, at the initial weights, frozen as in the run."""
    model = tiny_classifier()
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    batch = {k: torch.tensor(data[rows][k]) for k in data.column_names}
    model(**batch).loss.backward()
    return {
        n: torch.linalg.vector_norm(p.grad, norm_type).item()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_snapshot_equals_hand_computed_gradients(args_factory, norm_type):
    data = classification_data(16)
    args = args_factory(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=2,
        grad_snapshot_steps=1,
        max_grad_norm=0.01,
        clip_norm_type=norm_type,
        freeze_embeddings=True,
        freeze_first_n_layers=1,
    )
    model = tiny_classifier()
    trainer = GradTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    snapshots = load_grad_snapshots(args.output_dir)
    assert [s["step"] for s in snapshots] == [1, 2]
    first = snapshots[0]
    expected = hand_norms(data, slice(0, 8), norm_type)
    assert set(first["norms"]) == set(expected)
    assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in first["norms"])
    for name, value in expected.items():
        assert first["norms"][name] == pytest.approx(value, rel=1e-5), name
    total = torch.linalg.vector_norm(torch.tensor(list(expected.values())), norm_type).item()
    assert first["total_norm_pre_clip"] == pytest.approx(total, rel=1e-5)
    assert first["total_norm_post_clip"] == pytest.approx(0.01, rel=1e-3)  # clipping was active
    assert first["norm_type"] == ("inf" if math.isinf(norm_type) else norm_type)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert [s["total_norm_pre_clip"] for s in snapshots] == pytest.approx(logged, rel=1e-6)
    assert sorted(os.listdir(os.path.join(args.output_dir, "grad_snapshots"))) == [
        "step-00000001.json",
        "step-00000002.json",
    ]  # no temporary file left behind


def test_snapshot_period_and_folder_argument(args_factory):
    args = args_factory(per_device_train_batch_size=2, max_steps=7, grad_snapshot_steps=3)
    GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(14)).train()
    steps = [s["step"] for s in load_grad_snapshots(os.path.join(args.output_dir, "grad_snapshots"))]
    assert steps == [3, 6]
    with pytest.raises(FileNotFoundError, match="No gradient snapshot folder"):
        load_grad_snapshots(os.path.join(args.output_dir, "missing"))


def test_frozen_parameters_file(args_factory):
    args = args_factory(per_device_train_batch_size=4, max_steps=1, freeze_embeddings=True, freeze_first_n_layers=2)
    model = tiny_classifier()
    GradTrainer(model=model, args=args, train_dataset=classification_data(4)).train()
    with open(os.path.join(args.output_dir, "frozen_parameters.json")) as f:
        content = json.load(f)
    params = dict(model.named_parameters())
    frozen = [
        n for n in params if n.startswith(("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1."))
    ]
    trainable = [n for n in params if n not in frozen]
    assert content["frozen"] == frozen
    assert content["trainable"] == trainable
    # hidden 16, vocab 64, 64 positions, 2 token types: 1024 + 1024 + 32 + 32 (LayerNorm) embedding elements;
    # each BERT layer: 4 * (16*16 + 16) attention+output + 2 LayerNorms (64) + 16*32+32 + 32*16+16 feed-forward.
    per_layer = 4 * (16 * 16 + 16) + 2 * 32 + (16 * 32 + 32) + (32 * 16 + 16)
    assert content["num_frozen"] == 64 * 16 + 64 * 16 + 2 * 16 + 32 + 2 * per_layer
    assert content["num_trainable"] == sum(params[n].numel() for n in trainable)
    assert content["layer_stack"] == "bert.encoder.layer" and content["embeddings"] == ["bert.embeddings"]


def test_callback_on_plain_trainer_matches_grad_trainer(tmp_path):
    """On a plain Trainer the callback measures through gradient hooks; same numbers as GradTrainer's."""
    data = classification_data(8)
    common = dict(
        per_device_train_batch_size=4,
        max_steps=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",
        max_grad_norm=0.01,
        disable_tqdm=True,
    )
    plain_args = T.TrainingArguments(output_dir=str(tmp_path / "plain"), **common)
    model = tiny_classifier()
    T.Trainer(
        model=model, args=plain_args, train_dataset=data, callbacks=[GradSnapshotCallback(every_n_steps=1)]
    ).train()
    ours_args = T.TrainingArguments(output_dir=str(tmp_path / "ours"), **common)
    trainer = GradTrainer(
        model=tiny_classifier(), args=ours_args, train_dataset=data, callbacks=[GradSnapshotCallback(every_n_steps=1)]
    )
    trainer.train()
    plain, ours = load_grad_snapshots(tmp_path / "plain"), load_grad_snapshots(tmp_path / "ours")
    assert [s["step"] for s in plain] == [1, 2]
    for a, b in zip(plain, ours, strict=True):
        assert a["norms"].keys() == b["norms"].keys()
        for name in a["norms"]:
            assert a["norms"][name] == pytest.approx(b["norms"][name], rel=1e-5)
        assert a["total_norm_pre_clip"] == pytest.approx(b["total_norm_pre_clip"], rel=1e-5)
        assert a["total_norm_post_clip"] == pytest.approx(b["total_norm_post_clip"], rel=1e-4)
    assert os.path.exists(tmp_path / "plain" / "frozen_parameters.json")
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters() if p._post_accumulate_grad_hooks)


def test_callback_with_its_own_norm_type(args_factory):
    data = classification_data(4)
    args = args_factory(per_device_train_batch_size=4, max_steps=1, max_grad_norm=1e-3, clip_norm_type=2.0)
    GradTrainer(
        model=tiny_classifier(),
        args=args,
        train_dataset=data,
        callbacks=[GradSnapshotCallback(every_n_steps=1, norm_type=1.0)],
    ).train()
    (snapshot,) = load_grad_snapshots(args.output_dir)
    reference = tiny_classifier()
    reference(**{k: torch.tensor(data[0:4][k]) for k in data.column_names}).loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()], 1.0).item()
    assert snapshot["norm_type"] == 1.0
    assert snapshot["total_norm_pre_clip"] == pytest.approx(expected, rel=1e-5)


def test_write_errors_surface(args_factory):
    """Snapshots are written on a background thread; a failed write still fails the run, by the end of train()."""
    args = args_factory(per_device_train_batch_size=4, max_steps=2, grad_snapshot_steps=1)
    os.makedirs(args.output_dir)
    with open(os.path.join(args.output_dir, "grad_snapshots"), "w") as f:
        f.write("a file where the snapshot folder should be")
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(8))
    with pytest.raises((FileExistsError, NotADirectoryError)):
        trainer.train()


def test_a_fresh_run_warns_of_an_earlier_runs_snapshots_in_its_folder_and_a_resumed_one_does_not(
    args_factory, caplog, single_thread
):
    import logging

    args = args_factory(per_device_train_batch_size=2, max_steps=4, grad_snapshot_steps=1, save_strategy="steps",
                        save_steps=2)  # fmt: skip
    GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16)).train()
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16)).train()
    warnings = [r.getMessage() for r in caplog.records if "of an earlier run" in r.getMessage()]
    assert len(warnings) == 1 and "4 gradient snapshot(s) of an earlier run (steps 1 to 4)" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16)).train(
            resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2")
        )
    assert "of an earlier run" not in caplog.text


def test_a_run_resumed_with_another_norm_type_warns_that_its_snapshots_mix_norms(args_factory, caplog, single_thread):
    import logging

    args = args_factory(per_device_train_batch_size=2, max_steps=4, grad_snapshot_steps=1, save_strategy="steps",
                        save_steps=2)  # fmt: skip
    GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16)).train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    for norm_type, warned in ((2.0, False), ("inf", True)):
        caplog.clear()
        args.clip_norm_type = norm_type
        with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
            GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16)).train(
                resume_from_checkpoint=checkpoint
            )
        assert (
            "up to step 2 are in norm type 2 and this resumed run takes its own in norm type inf" in caplog.text
        ) is warned
