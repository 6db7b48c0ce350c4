"""`GradSettings`: the gradient-tool settings resolved once from any `TrainingArguments`, frozen, read by attribute."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
from transformers import TrainingArguments

from hf_gradtools import GradArgumentsMixin, GradTrainingArguments
from hf_gradtools.settings import GradSettings


def test_a_plain_training_arguments_reads_every_field_as_its_default(tmp_path):
    settings = GradSettings.from_args(TrainingArguments(str(tmp_path), report_to="none"))
    assert settings == GradSettings()
    assert GradSettings.from_args(None) == GradSettings()
    assert GradSettings.from_args(SimpleNamespace()) == GradSettings()


def test_the_fields_and_defaults_are_the_mixins():
    def defaults(cls):
        return {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.name != "args"
        }

    assert defaults(GradSettings) == defaults(GradArgumentsMixin)


def test_grad_training_arguments_carry_their_values(tmp_path):
    args = GradTrainingArguments(
        str(tmp_path),
        report_to="none",
        freeze_first_n_layers=2,
        clip_norm_type="inf",
        clip_algorithm="agc",
        agc_exclude=None,
        grad_snapshot_tensors=["classifier"],
    )
    settings = GradSettings.from_args(args)
    assert settings.freeze_first_n_layers == 2
    assert settings.clip_norm_type == math.inf
    assert settings.clip_algorithm == "agc"
    assert settings.agc_exclude == []
    assert settings.grad_snapshot_tensors == ["classifier"]
    assert settings.args is args
    assert settings.max_grad_norm == args.max_grad_norm  # a host field reads through to the arguments
    assert settings != GradSettings()


def test_settings_are_frozen(tmp_path):
    settings = GradSettings.from_args(GradTrainingArguments(str(tmp_path), report_to="none"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.clip_norm_type = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        GradSettings().freeze_embeddings = True


def test_a_misspelt_field_raises_attribute_error(tmp_path):
    with pytest.raises(AttributeError, match="clip_nrom_type"):
        GradSettings.from_args(GradTrainingArguments(str(tmp_path), report_to="none")).clip_nrom_type  # noqa: B018
    with pytest.raises(AttributeError, match="clip_nrom_type"):
        GradSettings().clip_nrom_type  # noqa: B018


def test_a_value_not_allowed_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"`freeze_first_n_layers` must be a non-negative integer, got -1"):
        GradSettings.from_args(SimpleNamespace(freeze_first_n_layers=-1))
