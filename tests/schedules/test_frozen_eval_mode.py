"""Frozen modules stay in eval mode: no dropout in them, BatchNorm statistics fixed; the rest trains as usual."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_gradtools import freeze, freeze_embeddings, freeze_first_n_layers, unfreeze
from hf_gradtools.schedules import find_frozen_modules, set_frozen_eval_mode
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


def conv_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5)),  # frozen below
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5)),
        torch.nn.Linear(8, 1),
    )


def test_frozen_dropout_and_batchnorm_stay_in_eval_mode_at_every_step():
    model = conv_net()
    freeze(model[0])
    frozen_bn = copy.deepcopy(model[0][1].state_dict())
    trainable_bn = copy.deepcopy(model[1][1].state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        model.train()  # as the Trainer does before every step
        assert set_frozen_eval_mode(model) == ["0"]
        assert not any(m.training for m in model[0].modules())
        assert all(m.training for m in model[1].modules()) and model.training
        x = torch.randn(16, 4, generator=g)
        hidden = model[0](x)
        with torch.no_grad():  # the frozen part is deterministic: eval-mode BatchNorm, no dropout
            expected = torch.nn.functional.batch_norm(
                model[0][0](x), frozen_bn["running_mean"], frozen_bn["running_var"], model[0][1].weight,
                model[0][1].bias, training=False, eps=model[0][1].eps,
            )  # fmt: skip
        torch.testing.assert_close(hidden, expected)
        loss = model[2](model[1](hidden)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model[0][1].state_dict().items():
        assert torch.equal(value, frozen_bn[key]), key
    assert not torch.equal(model[1][1].running_mean, trainable_bn["running_mean"])
    assert model[1][1].num_batches_tracked.item() == 4


def test_bert_frozen_blocks_and_their_dropout():
    config = tiny_config("bert")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    freeze_embeddings(model)
    freeze_first_n_layers(model, 2)
    model.train()
    names = set_frozen_eval_mode(model)
    assert names == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert [name for name, _ in find_frozen_modules(model)] == names
    modules = dict(model.named_modules())
    assert not modules["bert.embeddings.dropout"].training
    assert not modules["bert.encoder.layer.1.output.dropout"].training
    assert modules["bert.encoder.layer.2.output.dropout"].training
    assert modules["dropout"].training and modules["classifier"].training

    # A block unfrozen by the schedule goes back to train mode at the next model.train().
    unfreeze(model.bert.encoder.layer[1])
    model.train()
    assert set_frozen_eval_mode(model) == ["bert.embeddings", "bert.encoder.layer.0"]
    assert modules["bert.encoder.layer.1.output.dropout"].training


def test_nothing_frozen_and_everything_frozen():
    model = conv_net()
    assert set_frozen_eval_mode(model.train()) == []
    assert all(m.training for m in model.modules())
    freeze(model)
    assert set_frozen_eval_mode(model.train()) == [""]
    assert not any(m.training for m in model.modules())


def test_a_partly_frozen_module_stays_in_train_mode():
    model = conv_net()
    freeze(model[0][0])  # the Linear, not the BatchNorm's affine parameters
    assert set_frozen_eval_mode(model.train()) == ["0.0"]
    assert model[0].training and model[0][1].training and model[0][2].training


def neftune_run(tmp_path, name, **fields):
    from hf_gradtools import GradTrainer
    from tests.conftest import classification_data, grad_args, tiny_classifier

    torch.manual_seed(0)
    model = tiny_classifier()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # so that eval mode changes nothing but NEFTune
    settings = dict(freeze_embeddings=True, freeze_first_n_layers=1, max_steps=4, **fields)
    trainer = GradTrainer(
        model=model, args=grad_args(tmp_path / name, **settings), train_dataset=classification_data()
    )
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_neftune_noise_on_frozen_embeddings_stays_on_in_frozen_eval_mode(tmp_path):
    """NEFTune adds noise to the input embeddings in train mode only; frozen (as under LoRA) and with
    `frozen_eval_mode`, they keep it: the run is the one without `frozen_eval_mode` (dropout is 0), not the one
    without NEFTune. The activation cache then serves nothing (the prefix's output is not fixed), and says so."""
    noised = neftune_run(tmp_path, "train-mode", neftune_noise_alpha=5.0)
    without = neftune_run(tmp_path, "no-neftune", frozen_eval_mode=True)
    assert neftune_run(tmp_path, "eval-mode", neftune_noise_alpha=5.0, frozen_eval_mode=True) == noised != without
    with pytest.warns(UserWarning, match="NEFTune adds noise to the output of `bert.embeddings.word_embeddings`"):
        cached = neftune_run(
            tmp_path, "cached", neftune_noise_alpha=5.0, frozen_eval_mode=True, cache_frozen_activations=True
        )
    assert cached == noised
