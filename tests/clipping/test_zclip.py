"""ZClip (`clip_algorithm="zclip"`): the formulas on hand-made gradients, a GradTrainer run with a loss spike
against a hand-written loop, resume during and after warmup, and bad checkpoint states and settings refused."""

from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from transformers import HfArgumentParser

from hf_gradtools import DamagedCheckpointError, GradTrainer, GradTrainingArguments
from hf_gradtools.checkpoints import TRAINING_STATE_FILE
from hf_gradtools.clipping import ZClip, build_clip_algorithm, clip_by
from hf_gradtools.settings import GradSettings
from hf_gradtools.trainer import check_engine_support
from tests.clipping.test_clip_registry import sgd_args
from tests.conftest import classification_data, tiny_classifier
from tests.trainer.test_clipping_guards_monitoring_in_grad_trainer import assert_same_parameters, rows

EPS = 1e-6
KEYS = ("zclip_mean", "zclip_std", "zclip_z", "zclip_clipped")


def layer_with(grad: list[float]) -> list[tuple[str, torch.nn.Parameter]]:
    weight = torch.nn.Parameter(torch.zeros(1, len(grad)))
    weight.grad = torch.tensor([grad])
    return [("weight", weight)]


def step(clipper: ZClip, grad: list[float]) -> tuple[float, list[float]]:
    """One optimizer step of `clipper` on the gradient `grad`: the norm it returns, and the gradient it leaves."""
    named = layer_with(grad)
    post = clipper.clip(named, 2.0)
    return post.item(), named[0][1].grad.flatten().tolist()


def stats(clipper: ZClip) -> tuple[float, float]:
    return clipper.mu.item(), clipper.var.item()


# ---- the formulas, on hand-made gradients ----


def test_warmup_then_spike_then_no_clip_by_hand():
    alpha, t = 0.5, 2.0
    clipper = ZClip(alpha=alpha, z_threshold=t, warmup_steps=3)
    for grad in ([3.0, 0.0], [0.0, 4.0], [3.0, 4.0]):  # norms 3, 4, 5: left as they are (no max_grad_norm)
        assert step(clipper, grad) == (math.hypot(*grad), grad)
        assert clipper.log_entries() == {}
    mu, var = 4.0, (1 + 0 + 1) / 3  # the mean and population variance of 3, 4, 5
    assert stats(clipper) == pytest.approx((mu, var), rel=1e-6)

    # 4.5: z = 0.5 / 0.8165 = 0.61 <= 2, not clipped; the statistics follow it.
    assert step(clipper, [0.0, 4.5]) == (4.5, [0.0, 4.5])
    z = (4.5 - mu) / (math.sqrt(var) + EPS)
    mu = alpha * mu + (1 - alpha) * 4.5
    var = alpha * var + (1 - alpha) * (4.5 - mu) ** 2
    assert stats(clipper) == pytest.approx((mu, var), rel=1e-6)
    logs = clipper.log_entries()
    assert logs == pytest.approx({"zclip_mean": mu, "zclip_std": math.sqrt(var), "zclip_z": z, "zclip_clipped": 0})

    # A spike of norm 50: z = 75.8 > 2, scaled to mu + t**2 * std / z.
    std = math.sqrt(var)
    z = (50.0 - mu) / (std + EPS)
    target = mu + t**2 * std / z
    coef = target / (50.0 + EPS)
    post, grad = step(clipper, [30.0, 40.0])
    assert post == pytest.approx(target, rel=1e-6) and grad == pytest.approx([30 * coef, 40 * coef], rel=1e-6)
    assert math.hypot(*grad) == pytest.approx(target, rel=1e-6)
    mu = alpha * mu + (1 - alpha) * post
    var = alpha * var + (1 - alpha) * (post - mu) ** 2
    assert clipper.log_entries() == pytest.approx(
        {"zclip_mean": mu, "zclip_std": math.sqrt(var), "zclip_z": z, "zclip_clipped": 1}, rel=1e-6
    )
    assert clipper.steps == 5


def test_max_grad_norm_caps_warmup_and_both_branches():
    alpha, t, cap = 0.5, 2.0, 4.0
    clipper = ZClip(alpha=alpha, z_threshold=t, warmup_steps=3, max_norm=cap)
    posts = [step(clipper, grad)[0] for grad in ([3.0, 0.0], [0.0, 4.0], [3.0, 4.0])]
    assert posts == pytest.approx([3.0, 4.0, 5.0 * cap / (5.0 + EPS)])  # clipped as `norm` clips
    mu, var = 4.0, 2 / 3  # of the norms before the cap
    assert stats(clipper) == pytest.approx((mu, var), rel=1e-6)

    # 4.5: no spike, but above the cap: scaled to 4, and the statistics follow the capped norm.
    post, _ = step(clipper, [0.0, 4.5])
    assert post == pytest.approx(4.5 * cap / (4.5 + EPS), rel=1e-6) and clipper.log_entries()["zclip_clipped"] == 0
    mu = alpha * mu + (1 - alpha) * post
    var = alpha * var + (1 - alpha) * (post - mu) ** 2
    assert stats(clipper) == pytest.approx((mu, var), rel=1e-6)

    # A spike whose ZClip bound (4.03) is above the cap: the cap wins.
    z = (50.0 - mu) / (math.sqrt(var) + EPS)
    assert mu + t**2 * math.sqrt(var) / z > cap
    post, grad = step(clipper, [30.0, 40.0])
    assert post == pytest.approx(50.0 * cap / (50.0 + EPS), rel=1e-6) and math.hypot(*grad) == pytest.approx(post)
    assert clipper.log_entries()["zclip_clipped"] == 1


def test_from_args_reads_the_fields_and_max_grad_norm(tmp_path):
    args = GradTrainingArguments(
        str(tmp_path), report_to="none", clip_algorithm="zclip", zclip_alpha=0.9, zclip_z_threshold=3.0,
        zclip_warmup_steps=7, max_grad_norm=0.0,
    )  # fmt: skip
    clipper = build_clip_algorithm("zclip", GradSettings.from_args(args))
    assert (clipper.alpha, clipper.z_threshold, clipper.warmup_steps, clipper.max_norm) == (0.9, 3.0, 7, None)
    assert (
        ZClip.from_args(GradSettings.from_args(GradTrainingArguments(str(tmp_path), report_to="none"))).max_norm == 1
    )


def test_the_norm_after_value_clipping_in_any_norm_type():
    clipper = ZClip(warmup_steps=2)
    weight = torch.nn.Parameter(torch.zeros(1, 2))
    weight.grad = torch.tensor([[3.0, -0.5]])
    result = clip_by(clipper, [("weight", weight)], norm_type=math.inf, clip_value=1.0)
    assert result.total_norm.item() == 3.0 and clipper.state_dict()["warmup_norms"] == [1.0]  # clamped, inf-norm


def test_nonfinite_norms_do_not_poison_the_statistics():
    clipper = ZClip(alpha=0.5, warmup_steps=3)
    for grad in ([1.0], [math.nan], [3.0]):
        step(clipper, grad)
    assert stats(clipper) == pytest.approx((2.0, 1.0))  # of 1 and 3; the NaN step is left out
    assert clipper.state_dict() == {"steps": 3, "warmup_norms": [], "mu": 2.0, "var": 1.0}
    for grad in ([math.inf], [math.nan]):
        step(clipper, grad)
        assert stats(clipper) == (2.0, 1.0)  # skipped, with `torch.where`
    assert clipper.log_entries()["zclip_clipped"] == 0  # a NaN z clips nothing

    # Every warmup norm non-finite: no statistics (NaN, saved as such); the first finite norm starts them.
    clipper = ZClip(alpha=0.5, warmup_steps=1)
    step(clipper, [math.inf])
    assert all(math.isnan(v) for v in stats(clipper))
    state = clipper.state_dict()
    assert math.isnan(state["mu"]) and math.isnan(state["var"])
    assert step(clipper, [2.5]) == (2.5, [2.5]) and stats(clipper) == (2.5, 0.0)


def test_no_host_sync_per_step():
    """On the meta device every read of a value fails: the steps, warmup and after, never read one back."""
    clipper = ZClip(warmup_steps=2, max_norm=1.0)
    weight = torch.nn.Parameter(torch.zeros(3, device="meta"))
    weight.grad = torch.zeros(3, device="meta")
    for _ in range(4):
        post = clipper.clip_with_norm([("weight", weight)], 2.0, torch.ones((), device="meta"))
    assert post.device.type == "meta" and clipper.steps == 4 and clipper.mu.device.type == "meta"
    with pytest.raises(NotImplementedError):  # the logs do read back, at logging steps only
        clipper.log_entries()


def test_state_round_trip_continues_exactly():
    norms = [[1.0], [2.0], [4.0], [3.0], [40.0], [2.0]]
    for cut in (1, 4):  # during warmup, and after it
        whole, first = ZClip(alpha=0.8, warmup_steps=3), ZClip(alpha=0.8, warmup_steps=3)
        for grad in norms[:cut]:
            step(whole, grad)
            step(first, grad)
        second = ZClip(alpha=0.8, warmup_steps=3)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for grad in norms[cut:]:
            assert step(second, grad) == step(whole, grad)
        assert second.state_dict() == whole.state_dict() and second.log_entries() == whole.log_entries()


# ---- a GradTrainer run against a hand-written loop ----

WARMUP, ALPHA, THRESHOLD, STEPS, SPIKE, SCALE, CAP = 3, 0.8, 2.5, 8, 6, 1000.0, 0.5


class SpikeTrainer(GradTrainer):
    """Multiplies the loss of every micro-batch of optimizer step `SPIKE` (1-based) by `SCALE`."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.state.global_step + 1 != SPIKE:
            return result
        return (result[0] * SCALE, *result[1:]) if return_outputs else result * SCALE


class HandZClip:
    """ZClip as the paper states it, in Python floats; `logs` holds `KEYS` of each step after warmup."""

    def __init__(self, alpha, threshold, warmup, max_norm):
        self.alpha, self.t, self.warmup, self.max_norm = alpha, threshold, warmup, max_norm
        self.norms, self.mu, self.var, self.logs, self.posts = [], None, None, [], []

    def __call__(self, grads: list[torch.Tensor]) -> None:
        g = torch.linalg.vector_norm(torch.stack([x.norm() for x in grads])).item()
        if self.mu is None:
            self.norms.append(g)
            bound = self.max_norm
        else:
            std = math.sqrt(self.var)
            z = (g - self.mu) / (std + EPS)
            clipped = z > self.t
            bound = min(self.mu + self.t**2 * std / z if clipped else math.inf, self.max_norm)
        coef = min(1.0, bound / (g + EPS))
        for x in grads:
            x.mul_(coef)
        post = torch.linalg.vector_norm(torch.stack([x.norm() for x in grads])).item()
        self.posts.append(post)
        if self.mu is None:
            if len(self.norms) == self.warmup:
                self.mu, self.var = statistics.fmean(self.norms), statistics.pvariance(self.norms)
            return
        self.mu = self.alpha * self.mu + (1 - self.alpha) * post
        self.var = self.alpha * self.var + (1 - self.alpha) * (post - self.mu) ** 2
        self.logs.append([self.mu, math.sqrt(self.var), z, int(clipped)])


def hand_run(data, hand: HandZClip, *, batch=4, accumulation=2, lr=1e-1):
    """loss / N (x SCALE at step SPIKE), backward, ZClip by hand, SGD step, zero."""
    model = tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for index in range(STEPS):
        for micro in range(accumulation):
            start = (index * accumulation + micro) * batch
            loss = model(**rows(data, start, start + batch)).loss
            ((loss * SCALE if index + 1 == SPIKE else loss) / accumulation).backward()
        hand([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad()
    return model


def zclip_args(folder, **fields):
    return sgd_args(
        folder, clip_algorithm="zclip", zclip_alpha=ALPHA, zclip_z_threshold=THRESHOLD, zclip_warmup_steps=WARMUP,
        max_steps=STEPS, max_grad_norm=CAP, log_grad_norms=True, **fields,
    )  # fmt: skip


def zclip_logs(trainer) -> list[list[float]]:
    """`KEYS` of each training log that has them, with its step."""
    return [[h["step"], *(h[k] for k in KEYS)] for h in trainer.state.log_history if "zclip_mean" in h]


def test_run_equals_hand_loop_and_clips_the_spike(tmp_path, single_thread):
    data = classification_data(STEPS * 8)
    hand = HandZClip(ALPHA, THRESHOLD, WARMUP, max_norm=CAP)
    expected = hand_run(data, hand)
    trainer = SpikeTrainer(model=tiny_classifier(), args=zclip_args(tmp_path), train_dataset=data)
    assert trainer.args.logging_steps == 1
    trainer.train()
    assert_same_parameters(trainer.model, expected)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    assert all("zclip_mean" not in h for h in logs[:WARMUP])  # no statistics used yet
    got = [[h[k] for k in KEYS] for h in logs[WARMUP:]]
    assert len(got) == len(hand.logs) == STEPS - WARMUP
    for step_logs, hand_logs in zip(got, hand.logs, strict=True):
        assert step_logs == pytest.approx(hand_logs, rel=1e-6, abs=1e-6)
    assert [h["grad_norm_post_clip"] for h in logs] == pytest.approx(hand.posts, rel=1e-5)
    assert logs[0]["grad_norm"] > CAP and logs[0]["grad_norm_post_clip"] == pytest.approx(CAP, rel=1e-5)  # as `norm`

    # The spike: clipped to the formula's norm, from the statistics the previous step left.
    before, spike = logs[SPIKE - 2], logs[SPIKE - 1]
    mu, std = before["zclip_mean"], before["zclip_std"]
    assert spike["grad_norm"] > 100 * mu and spike["zclip_clipped"] == 1
    z = (spike["grad_norm"] - mu) / (std + EPS)
    assert spike["zclip_z"] == pytest.approx(z, rel=1e-5)
    target = mu + THRESHOLD**2 * std / z
    assert spike["grad_norm_post_clip"] == pytest.approx(target, rel=1e-5) and target < CAP
    assert [h["zclip_clipped"] for h in logs[WARMUP:] if h["step"] != SPIKE] == [0] * (STEPS - WARMUP - 1)


# ---- resume ----


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run, checkpointed every 2 steps (2: during warmup, 4: after it, before the spike)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("full")
    data = classification_data(STEPS * 8)
    trainer = SpikeTrainer(
        model=tiny_classifier(), args=zclip_args(folder, save_strategy="steps", save_steps=2), train_dataset=data
    )
    trainer.train()
    torch.set_num_threads(torch_threads)
    return SimpleNamespace(trainer=trainer, data=data, out=folder / "out")


@pytest.mark.parametrize("checkpoint", [2, 4], ids=["during-warmup", "after-warmup"])
def test_resume_continues_exactly(full_run, tmp_path, checkpoint, single_thread):
    folder = full_run.out / f"checkpoint-{checkpoint}"
    with open(folder / TRAINING_STATE_FILE) as f:
        saved = json.load(f)["zclip"]
    assert saved["steps"] == checkpoint and (saved["mu"] is None) == (checkpoint < WARMUP)
    assert len(saved["warmup_norms"]) == (checkpoint if checkpoint < WARMUP else 0)
    resumed = SpikeTrainer(model=tiny_classifier(seed=5), args=zclip_args(tmp_path), train_dataset=full_run.data)
    resumed.train(resume_from_checkpoint=str(folder))
    assert_same_parameters(resumed.model, full_run.trainer.model)
    expected = zclip_logs(full_run.trainer)
    assert len(expected) == STEPS - WARMUP
    for got, want in zip(zclip_logs(resumed), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_damaged_state_is_refused_naming_the_field(full_run, tmp_path, single_thread):
    folder = full_run.out / "checkpoint-4"
    state_file = folder / TRAINING_STATE_FILE
    good = state_file.read_text()
    state = json.loads(good)
    state["zclip"]["var"] = -0.5
    state_file.write_text(json.dumps(state))
    try:
        resumed = SpikeTrainer(model=tiny_classifier(), args=zclip_args(tmp_path), train_dataset=full_run.data)
        with pytest.raises(DamagedCheckpointError) as caught:
            resumed.train(resume_from_checkpoint=str(folder))
    finally:
        state_file.write_text(good)
    message = str(caught.value)
    assert (
        TRAINING_STATE_FILE in message
        and "`zclip.var` must be a non-negative finite float32 number, got -0.5" in message
    )


# ---- bad states and settings ----

DURING = {"steps": 2, "warmup_norms": [1.0, math.nan], "mu": None, "var": None}
AFTER = {"steps": 9, "warmup_norms": [], "mu": 1.5, "var": 0.25}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([1.0], "must be a JSON object, got [1.0]"),
        ({**AFTER, "steps": -1}, "`steps` must be a non-negative integer, got -1"),
        ({**AFTER, "steps": 2.0}, "`steps` must be a non-negative integer, got 2.0"),
        ({**AFTER, "var": -0.5}, "`var` must be a non-negative finite float32 number, got -0.5"),
        ({**AFTER, "mu": "1.5"}, "`mu` must be a non-negative finite float32 number, got '1.5'"),
        ({**AFTER, "mu": math.inf}, "`mu` must be a non-negative finite float32 number, got inf"),
        ({**AFTER, "var": math.nan}, "`var` must be NaN exactly when `mu` is, got nan"),
        ({**AFTER, "var": None}, "`var` must be null exactly when `mu` is, got None"),
        ({**AFTER, "warmup_norms": [1.0]}, "`warmup_norms` must be empty once `mu` and `var` are set"),
        ({**AFTER, "steps": 0}, "`steps` must be positive once `mu` and `var` are set, got 0"),
        ({**DURING, "warmup_norms": [1.0, -2.0]}, "`warmup_norms[1]` must be a non-negative finite "
         "float32 number or NaN"),
        ({**DURING, "warmup_norms": "1.0"}, "`warmup_norms` must be a list of numbers, got '1.0'"),
        ({**DURING, "steps": 3, "warmup_norms": [1.0, 2.0, 3.0]}, "`warmup_norms` holds 3 norms, but the statistics "
         "start after `zclip_warmup_steps`=3"),
        ({**DURING, "steps": 1}, "`steps` must equal the 2 warmup norms, got 1"),
        ({**AFTER, "history": []}, "`history` is not a field of this state"),
        ({k: v for k, v in AFTER.items() if k != "mu"}, "`mu` is missing"),
    ],
)  # fmt: skip
def test_bad_state_is_refused_naming_the_field(state, message):
    clipper = ZClip(warmup_steps=3)
    with pytest.raises(ValueError, match="ZClip state must be") as caught:
        clipper.load_state_dict(state)
    assert message in str(caught.value)
    assert clipper.steps == 0 and clipper.mu is None  # nothing half-restored


def test_good_states_load():
    for state in (DURING, AFTER, {"steps": 1, "warmup_norms": [], "mu": math.nan, "var": math.nan}):
        clipper = ZClip(warmup_steps=3)
        clipper.load_state_dict(state)
        saved = clipper.state_dict()
        assert json.dumps(saved) == json.dumps(state)  # NaN included


def test_bad_settings_are_refused_from_python_the_command_line_and_json(tmp_path):
    with pytest.raises(ValueError, match=r"`zclip_z_threshold` must be a finite positive number, got -1.0"):
        GradTrainingArguments(str(tmp_path), report_to="none", zclip_z_threshold=-1.0)
    with pytest.raises(ValueError, match=r"`zclip_z_threshold` must be a finite positive number, got inf"):
        GradTrainingArguments(str(tmp_path), report_to="none", zclip_z_threshold=math.inf)
    with pytest.raises(ValueError, match=r"`zclip_alpha` must be a number in \(0, 1\), got 1.5"):
        ZClip(alpha=1.5)
    parser = HfArgumentParser(GradTrainingArguments)
    with pytest.raises(ValueError, match=r"`zclip_alpha` must be a number in \(0, 1\), got 1.5"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--zclip_alpha", "1.5"])
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "zclip_warmup_steps": 0}))
    with pytest.raises(ValueError, match="`zclip_warmup_steps` must be a positive integer, got 0"):
        parser.parse_json_file(str(path))
    (cli,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--clip_algorithm", "zclip", "--zclip_alpha", "0.9", "--report_to", "none"]
    )
    assert (cli.clip_algorithm, cli.zclip_alpha, cli.zclip_warmup_steps) == ("zclip", 0.9, 25)


def test_engines_that_clip_themselves_refuse_zclip():
    for engine, name in [
        ({"deepspeed": "ds.json"}, "DeepSpeed"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "FSDP1"),
    ]:
        with pytest.raises(ValueError, match=f"`clip_algorithm` not supported with {name}"):
            check_engine_support(SimpleNamespace(**engine, clip_algorithm="zclip"))
    check_engine_support(SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}, clip_algorithm="zclip"))
