"""Automatic freezing (`auto_freeze`): the blocks logged as frozen follow the rule computed by hand from the logged
per-layer norms, a frozen block stops changing and leaves the optimizer, and a resumed run continues exactly."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as T

from hf_gradtools import ChangedSettingsError, GradTrainer
from hf_gradtools.checkpoints import check_state_components, load_training_state
from hf_gradtools.freezing import AutoFreeze, blocks_to_freeze, check_auto_freeze
from tests.conftest import classification_data, grad_args, tiny_config, torchrun

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS, INTERVAL, STEPS = 6, 3, 15


def six_layers(seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = tiny_config("bert")
    config.num_hidden_layers, config.num_labels = LAYERS, 2
    return T.AutoModelForSequenceClassification.from_config(config)


def auto_args(tmp_path, **fields):
    settings = dict(
        max_steps=STEPS,
        auto_freeze=True,
        auto_freeze_interval=INTERVAL,
        log_grad_norms=True,
        learning_rate=3e-3,
        optim="adamw_torch",
        frozen_eval_mode=True,
    )
    return grad_args(tmp_path, **{**settings, **fields})


class Snapshots(T.TrainerCallback):
    def __init__(self):
        self.params, self.state_sizes = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params[state.global_step] = copy.deepcopy({n: p.detach() for n, p in model.named_parameters()})
        held = {id(p) for p in optimizer.optimizer.state}
        self.state_sizes[state.global_step] = {n for n, p in model.named_parameters() if id(p) in held}


def by_hand(logs: list[dict], percentile=50.0, keep_last=1) -> list[int]:
    """The frozen block count logged at each step, computed from the logged norms by the rule."""
    frozen, counts, previous = 0, [], None
    for k in range(STEPS // INTERVAL):
        window = logs[k * INTERVAL : (k + 1) * INTERVAL]
        current = {i: sum(log[f"grad_norm/layer.{i}"] for log in window) for i in range(frozen, LAYERS)}
        decided = frozen
        if previous is not None:
            chosen, _, _ = blocks_to_freeze({i: previous[i] for i in current}, current, percentile, LAYERS, keep_last)
            decided = frozen + len(chosen)
        counts += [frozen] * (INTERVAL - 1) + [decided]  # logged after the decision at the interval's last step
        frozen = decided
        previous = {i: v for i, v in current.items() if i >= frozen}
    return counts


def test_the_frozen_blocks_follow_the_rule_by_hand(tmp_path):
    snapshots = Snapshots()
    trainer = GradTrainer(
        model=six_layers(), args=auto_args(tmp_path), train_dataset=classification_data(80), callbacks=[snapshots]
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["frozen_layers"] for log in logs] == by_hand(logs)
    component = trainer.component(AutoFreeze)
    assert component.frozen, "the rule froze no block: the run says nothing"
    step = next(d["step"] for d in component.decisions if d["froze"])
    first = component.decisions[[d["step"] for d in component.decisions].index(step)]["froze"][0]
    prefix = f"bert.encoder.layer.{first}."
    for later in range(step, STEPS + 1):
        for name, value in snapshots.params[later].items():
            if name.startswith(prefix):
                assert torch.equal(value, snapshots.params[step][name]), (later, name)
        if later > step:  # this callback ran before the decision at `step`
            assert not any(name.startswith(prefix) for name in snapshots.state_sizes[later])  # its state is freed
    if 0 in component.frozen:
        assert not any(p.requires_grad for p in trainer.model.bert.embeddings.parameters())
    record = _read_record(trainer.args.output_dir)  # rewritten at each decision that froze
    assert record["frozen"] == [name for name, p in trainer.model.named_parameters() if not p.requires_grad]
    decided = [
        {"step": d["step"], "froze": ["embeddings"] * (0 in d["froze"]) + [f"layer.{i}" for i in d["froze"]]}
        for d in component.decisions
    ]
    assert record["auto_freeze_history"] == [d for d in decided if d["froze"]]


def test_the_rule_on_numbers_by_hand():
    previous = {1: 4.0, 2: 4.0, 3: 4.0, 4: 4.0, 5: 4.0}
    current = {1: 4.2, 2: 4.1, 3: 6.0, 4: 2.0, 5: 4.0}  # r: 0.05, 0.025, 0.5, 0.5, 0.0
    assert blocks_to_freeze(previous, current, 50.0, 6, 1)[0] == []  # tau is 0.05: block 1 is not below it
    chosen, ratios, tau = blocks_to_freeze(previous, current, 60.0, num_blocks=6, keep_last=1)
    assert tau == pytest.approx(float(np.percentile([0.05, 0.025, 0.5, 0.5, 0.0], 60.0))) == pytest.approx(0.23)
    assert chosen == [1, 2] and ratios[3] == pytest.approx(0.5)  # block 3 stops the walk; block 5 is kept
    assert blocks_to_freeze(previous, current, 100.0, 6, 1)[0] == [1, 2]  # 0.5 < 0.5 is false
    assert blocks_to_freeze(previous, current, 100.0, 6, 5)[0] == []  # only block 0 may freeze: it is not here


def test_a_resumed_run_continues_exactly(tmp_path):
    data = classification_data(80)
    full = GradTrainer(model=six_layers(), args=auto_args(tmp_path / "full"), train_dataset=data)
    full.train()
    args = auto_args(tmp_path / "cut", save_strategy="steps", save_steps=7)
    GradTrainer(model=six_layers(), args=args, train_dataset=data).train()
    resumed = GradTrainer(model=six_layers(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-7"))
    logs = lambda t: [log["frozen_layers"] for log in t.state.log_history if "loss" in log]  # noqa: E731
    assert logs(resumed) == logs(full)
    for (name, p), q in zip(resumed.model.named_parameters(), full.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    checkpoint = os.path.join(args.output_dir, "checkpoint-14")
    assert load_training_state(checkpoint)["auto_freeze"]["frozen"], "nothing frozen by step 14: nothing to refuse"
    early = GradTrainer(
        model=six_layers(),
        args=auto_args(tmp_path / "cut", save_strategy="steps", save_steps=7, max_steps=8),
        train_dataset=data,
    )
    early.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-7"))  # before any freezing
    assert _read_record(args.output_dir)["frozen"] == [] and _read_record(args.output_dir)["auto_freeze_history"] == []
    snapshots = auto_args(tmp_path / "cut", save_strategy="steps", save_steps=7, grad_snapshot_steps=1)
    late = GradTrainer(model=six_layers(), args=snapshots, train_dataset=data)  # the callback writes the record too
    late.train(resume_from_checkpoint=checkpoint)  # the decisions before 14 come from the checkpoint
    record = lambda t: _read_record(t.args.output_dir)["auto_freeze_history"]  # noqa: E731
    assert record(late) == record(full) and record(full)
    without = auto_args(tmp_path / "cut", save_strategy="steps", save_steps=7, auto_freeze=False)
    with pytest.raises(
        ChangedSettingsError, match=r"saved with `auto_freeze`=True, which had frozen (embeddings, )?layer"
    ):
        GradTrainer(model=six_layers(), args=without, train_dataset=data).train(resume_from_checkpoint=checkpoint)


def _read_record(folder: str) -> dict:
    with open(os.path.join(folder, "frozen_parameters.json")) as f:
        return json.load(f)


def test_a_saved_entry_this_run_does_not_use_is_said(caplog):
    state = {"auto_freeze": {"previous": None, "sums": None, "frozen": [], "froze_embeddings": False}, "zclip": {}}
    with caplog.at_level("WARNING", logger="hf_gradtools"):
        check_state_components("ckpt", state, {"norm", "auto_freeze"})
    assert "ckpt holds the state of `zclip`, which this run does not use (set by `clip_algorithm`" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_gradtools"):
        check_state_components("ckpt", state, {"norm"})  # nothing was frozen yet: nothing trains again
    assert "`auto_freeze`, `zclip`" in caplog.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(auto_freeze_keep_last=LAYERS), "`auto_freeze_keep_last`=6 must be below the layer count"),
        (dict(auto_freeze_interval=0), "`auto_freeze_interval` must be a positive integer"),
        (dict(auto_freeze_percentile=0.0), r"`auto_freeze_percentile` must be a number in \(0, 100\]"),
        (dict(freeze_first_n_layers=1, gradual_unfreeze_steps=2), "opposite directions"),
        (dict(cache_frozen_activations=True, frozen_eval_mode=False), "needs `frozen_eval_mode`=True"),
        (dict(frozen_activation_cache_gb=float("inf")), "`frozen_activation_cache_gb` must be a positive finite"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        GradTrainer(model=six_layers(), args=auto_args(tmp_path, **fields))
    assert not os.path.exists(tmp_path / "out")


def test_a_model_from_model_init_and_fields_changed_later_are_checked(tmp_path):
    """The model-dependent checks run on a model `model_init` builds (at construction, before anything is written)
    and again at `train()` on fields changed since."""
    t5 = lambda: T.T5ForSequenceClassification(T.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=2))  # noqa: E731
    for model_init, fields, message in [
        (
            lambda: six_layers(),
            dict(auto_freeze_keep_last=6),
            "`auto_freeze_keep_last`=6 must be below the layer count",
        ),
        (t5, dict(cache_frozen_activations=True), "does not support T5ForSequenceClassification"),
    ]:
        with pytest.raises(ValueError, match=message):
            GradTrainer(
                model_init=model_init, args=auto_args(tmp_path, **fields), train_dataset=classification_data(8)
            )
        assert not os.path.exists(tmp_path / "out")
    trainer = GradTrainer(model=six_layers(), args=auto_args(tmp_path), train_dataset=classification_data(8))
    trainer.args.auto_freeze_keep_last = 6
    with pytest.raises(ValueError, match="`auto_freeze_keep_last`=6 must be below the layer count"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_with_the_activation_cache_a_run_equals_the_uncached_one(tmp_path):
    data = classification_data(24)  # 6 steps an epoch: an example kept in one epoch is served in the next
    plain = GradTrainer(model=six_layers(), args=auto_args(tmp_path / "plain", max_steps=24), train_dataset=data)
    plain.train()
    args = auto_args(tmp_path / "cached", cache_frozen_activations=True, max_steps=24)
    cached = GradTrainer(model=six_layers(), args=args, train_dataset=data)
    cached.train()
    logs = [log for log in cached.state.log_history if "loss" in log]
    plain_logs = [log for log in plain.state.log_history if "loss" in log]
    assert [log["frozen_layers"] for log in logs] == [log["frozen_layers"] for log in plain_logs]
    assert max(log["frozen_layers"] for log in logs) > 0
    assert [log["loss"] for log in logs] == pytest.approx([log["loss"] for log in plain_logs], rel=1e-5)
    for (name, p), q in zip(cached.model.named_parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(log["activation_cache_hit_rate"] > 0 for log in logs)


def auto_run(folder, cache: bool, **fields) -> dict:
    """3 epochs of 80 examples at a global batch of 8 (30 steps): what a process saw and ended with."""
    args = auto_args(folder, max_steps=30, cache_frozen_activations=cache, **fields)
    trainer = GradTrainer(model=six_layers(), args=args, train_dataset=classification_data(80))
    trainer.train()
    component = trainer.component(AutoFreeze)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {
        "params": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        "frozen": list(component.frozen),
        "steps": [d["step"] for d in component.decisions if d["froze"]],
        "frozen_layers": [log["frozen_layers"] for log in logs],
        "hit_rates": [log.get("activation_cache_hit_rate") for log in logs],
    }


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_freeze_as_one_process_with_their_global_batch(tmp_path):
    """Under DDP the rule reads the global per-layer norms, so 2 processes x batch 4 freeze the blocks one process
    with batch 8 freezes, at the same steps, and end on its parameters; with the cache too (served whole once the
    last decision is carried on)."""
    alone = auto_run(tmp_path / "alone", cache=False, per_device_train_batch_size=8)
    assert len(alone["frozen"]) >= 2 and len(alone["steps"]) >= 2, "the rule must freeze, twice, for this to say much"
    prefix = str(tmp_path / "out" / "result")
    torchrun(tmp_path, "ddp_auto_freeze.py", prefix)
    ranks = [torch.load(f"{prefix}.{rank}.pt") for rank in (0, 1)]
    for result in ranks:
        for cache in (False, True):
            run = result[cache]
            assert (run["frozen"], run["steps"], run["frozen_layers"]) == (
                alone["frozen"],
                alone["steps"],
                alone["frozen_layers"],
            ), cache
            for name, param in alone["params"].items():
                torch.testing.assert_close(run["params"][name], param, atol=1e-5, rtol=1e-5, msg=name)
        assert result[True]["hit_rates"][-3:] == [1.0] * 3  # the last steps of epoch 3 are served
    for cache in (False, True):
        for name, param in ranks[0][cache]["params"].items():
            assert torch.equal(ranks[1][cache]["params"][name], param), name


def ddp_args(**fields) -> SimpleNamespace:
    defaults = dict(
        world_size=2, ddp_find_unused_parameters=None, ddp_static_graph=None, activation_checkpointing=False
    )
    return SimpleNamespace(**{**defaults, **fields})


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(ddp_find_unused_parameters=False),
            r"needs `ddp_find_unused_parameters`=True, and it is False here \(set so",
        ),
        (dict(activation_checkpointing=True), "the Trainer's choice when activation checkpointing is on"),
        (dict(ddp_static_graph=True), "cannot run with `ddp_static_graph`=True"),
        (dict(fsdp="full_shard", fsdp_config={"version": 2}), "not supported with FSDP2"),
        (dict(world_size=1, deepspeed="ds.json"), "not supported with DeepSpeed"),
    ],
)
def test_processes_that_would_wait_for_a_frozen_block_are_refused(fields, message):
    settings = SimpleNamespace(auto_freeze=True, auto_freeze_keep_last=1)
    with pytest.raises(ValueError, match=message):
        check_auto_freeze(six_layers(), settings, ddp_args(**fields))
    check_auto_freeze(six_layers(), settings, ddp_args())  # DDP as the Trainer sets it up: unused ones are found
    check_auto_freeze(six_layers(), settings, ddp_args(activation_checkpointing=True, ddp_find_unused_parameters=True))


def component_on(model) -> tuple[AutoFreeze, SimpleNamespace]:
    """The rule's component on `model`, with percentile 100: blocks 0 and 1 of 3 freeze at the first decision."""
    settings = SimpleNamespace(
        auto_freeze_interval=1, auto_freeze_percentile=100.0, auto_freeze_keep_last=1, clip_norm_type=2.0
    )
    return AutoFreeze(settings), SimpleNamespace(model=model, optimizer=None, is_world_process_zero=lambda: False)


def decide(component, trainer) -> None:
    component._decide(trainer, 2, {0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.0, 1: 1.0, 2: 2.0})  # r = 0, 0, 1; tau = 1
    assert component.frozen == [0, 1]


@pytest.mark.parametrize("tied", [True, False])
def test_a_head_tied_to_the_embeddings_never_freezes(tied):
    config = tiny_config("gpt2")
    config.tie_word_embeddings = tied
    model = T.GPT2LMHeadModel(config)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    component, trainer = component_on(model)
    if tied:
        match = "leaves the input embeddings of GPT2LMHeadModel trainable: they are the same tensor as the output head"
        with pytest.warns(UserWarning, match=match):
            component.on_train_begin(trainer)
    else:
        component.on_train_begin(trainer)
    decide(component, trainer)
    assert not any(p.requires_grad for block in model.transformer.h[:2] for p in block.parameters())
    assert component.froze_embeddings is not tied
    assert model.transformer.wte.weight.requires_grad is tied and model.transformer.wpe.weight.requires_grad is tied
    assert model.lm_head.weight.requires_grad  # tied or a head of its own: never frozen


def test_a_model_without_input_embeddings_freezes_its_blocks_only():
    class Stack(torch.nn.Module):  # no `get_input_embeddings`: its embedding is not found as such
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
            self.head = torch.nn.Linear(4, 2)

    model = Stack()
    component, trainer = component_on(model)
    with pytest.warns(
        UserWarning, match="`auto_freeze`=True will freeze only the blocks of Stack: Stack has no input"
    ):
        component.on_train_begin(trainer)
    decide(component, trainer)  # no error at the decision (it stopped training at the first one)
    assert [p.requires_grad for p in model.layers.parameters()] == [False] * 4 + [True] * 2
    assert model.embed.weight.requires_grad and not component.froze_embeddings
