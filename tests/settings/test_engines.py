"""Engines that clip inside themselves (DeepSpeed, FSDP1) refuse the custom clipping and snapshot settings from
the arguments alone, before anything is touched; FSDP2 and the defaults pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hf_gradtools import GradTrainingArguments
from hf_gradtools.engines import check_optimizer_fields
from hf_gradtools.trainer import check_engine_support

DEEPSPEED = {"deepspeed": "ds_config.json"}
FSDP1 = {"fsdp": "full_shard", "fsdp_config": {"version": 1}}
FSDP2 = {"fsdp": "full_shard", "fsdp_config": {"version": 2}}
CUSTOM = [{"clip_norm_type": 1.0}, {"clip_grad_value": 0.5}, {"grad_snapshot_steps": 10}]


@pytest.mark.parametrize("custom", CUSTOM, ids=lambda c: next(iter(c)))
@pytest.mark.parametrize("engine, name", [(DEEPSPEED, "DeepSpeed"), (FSDP1, "FSDP1")], ids=["deepspeed", "fsdp1"])
def test_engines_that_clip_themselves_refuse_custom_settings(engine, name, custom):
    with pytest.raises(ValueError, match=rf"are not supported with {name}, which clips inside its own engine"):
        check_engine_support(SimpleNamespace(**engine, **custom))


@pytest.mark.parametrize("custom", [{}, *CUSTOM], ids=lambda c: next(iter(c), "defaults"))
def test_fsdp2_takes_every_setting_and_the_others_take_the_defaults(custom):
    check_engine_support(SimpleNamespace(**FSDP2, **custom))
    if not custom:
        check_engine_support(SimpleNamespace(**DEEPSPEED))
        check_engine_support(SimpleNamespace(**FSDP1, freeze_embeddings=True, freeze_first_n_layers=2))


@pytest.mark.parametrize("engine, name", [(FSDP1, "FSDP1"), (FSDP2, "FSDP2")], ids=["fsdp1", "fsdp2"])
def test_engines_that_shard_the_parameters_refuse_the_activation_cache(tmp_path, engine, name):
    """A process served from the cache skips the frozen blocks' forward, so their parameter gathers: the others
    would wait for it. (DeepSpeed, not installed here, goes through the same check.)"""
    out = tmp_path / "out"
    fields = {"frozen_eval_mode": True, "cache_frozen_activations": True}
    match = rf"`cache_frozen_activations`=True is not supported with {name}, which shards the parameters"
    with pytest.raises(ValueError, match=match):
        GradTrainingArguments(output_dir=str(out), **engine, **fields)
    assert not out.exists()
    with pytest.raises(ValueError, match="not supported with DeepSpeed"):
        check_optimizer_fields(SimpleNamespace(cache_frozen_activations=True), SimpleNamespace(**DEEPSPEED))
    GradTrainingArguments(output_dir=str(out), **fields)  # DDP or one device: taken
