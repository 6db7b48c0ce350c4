"""What the layout finds beyond text models: vision embeddings, stacks of stages, and structures it refuses."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import transformers as T
from torch import nn

from hf_gradtools import (
    GradTrainer,
    LayerStackNotFoundError,
    find_input_embeddings,
    find_layer_stack,
    freeze_embeddings,
    freeze_first_n_layers,
    get_frozen_parameters,
)
from tests.conftest import grad_args


def convnext():
    torch.manual_seed(0)
    config = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, num_labels=2)
    return T.ConvNextForImageClassification(config)


def vit():
    torch.manual_seed(0)
    config = T.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, num_labels=2,
    )  # fmt: skip
    return T.ViTForImageClassification(config)


def swin():
    torch.manual_seed(0)
    config = T.SwinConfig(
        embed_dim=8, depths=[2, 2], num_heads=[2, 2], image_size=32, patch_size=4, window_size=4, num_labels=2
    )
    return T.SwinForImageClassification(config)


def resnet():
    torch.manual_seed(0)
    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    return T.ResNetForImageClassification(config)


def wav2vec2():
    torch.manual_seed(0)
    config = T.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    )  # fmt: skip
    return T.Wav2Vec2ForSequenceClassification(config)


def funnel(block_sizes=(4, 4, 4), cls=T.FunnelForSequenceClassification):
    torch.manual_seed(0)
    config = T.FunnelConfig(vocab_size=50, block_sizes=list(block_sizes), d_model=16, n_head=2, d_head=8, d_inner=32)
    return cls(config)


def hinted_module(model: nn.Module, message: str) -> nn.Module:
    """The module that the error's `freeze(model....)` hint names; it must exist on the model."""
    expression = re.search(r"`freeze\((model[^`]*?)\)`", message).group(1)
    return eval(expression, {"model": model})  # an attribute path like model.resnet.embedder or model.a.b[0][:2]


# ---- vision embeddings ----


@pytest.mark.parametrize(
    "factory, expected",
    [(convnext, ["convnext.embeddings"]), (vit, ["vit.embeddings"]), (swin, ["swin.embeddings"])],
)
def test_vision_embeddings_are_the_patch_embedding_module(factory, expected):
    model = factory()
    assert [name for name, _ in find_input_embeddings(model)] == expected
    frozen = freeze_embeddings(model)
    assert frozen == [n for n, _ in model.named_parameters() if n.startswith(expected[0] + ".")]
    assert frozen and get_frozen_parameters(model) == frozen


def test_convnext_has_no_get_input_embeddings_but_its_embeddings_are_found():
    model = convnext()
    with pytest.raises(NotImplementedError):
        model.get_input_embeddings()
    assert find_input_embeddings(model) == [("convnext.embeddings", model.convnext.embeddings)]


@pytest.mark.parametrize(
    "factory, stem",
    [(resnet, lambda m: m.resnet.embedder), (wav2vec2, lambda m: m.wav2vec2.feature_extractor)],
)
def test_a_stem_without_patches_is_refused_with_a_hint_that_names_a_real_module(factory, stem):
    model = factory()
    with pytest.raises(LayerStackNotFoundError) as raised:
        freeze_embeddings(model)
    message = str(raised.value)
    assert message.startswith(f"{type(model).__name__} has no input embeddings")
    assert "`get_input_embeddings()` raises NotImplementedError" in message
    assert hinted_module(model, message) is stem(model)
    assert get_frozen_parameters(model) == []


def test_a_model_without_a_stack_gets_a_hint_that_names_a_real_module():
    class TwoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    model = TwoLinear()
    for call in (lambda: freeze_first_n_layers(model, 1), lambda: freeze_embeddings(model)):
        with pytest.raises(LayerStackNotFoundError) as raised:
            call()
        assert hinted_module(model, str(raised.value)) is model.a
    assert "it has no `get_input_embeddings()`" in str(raised.value)


# ---- what one layer is ----


def test_a_layer_of_convnext_is_a_stage_and_the_log_says_so(caplog):
    model = convnext()
    with caplog.at_level(logging.INFO, logger="hf_gradtools.freezing"):
        frozen = freeze_first_n_layers(model, 1)
    assert frozen == [n for n, _ in model.named_parameters() if n.startswith("convnext.encoder.stages.0.")]
    assert any(".layers.1." in n for n in frozen)  # both blocks of stage 0
    lines = [r.getMessage() for r in caplog.records if "a layer of" in r.getMessage()]
    assert lines == [
        "hf_gradtools: a layer of ConvNextForImageClassification is one ConvNextStage "
        "(`convnext.encoder.stages.<i>`) of 2, 2 ConvNextLayer blocks (`layers`); freeze_first_n_layers=1 freezes "
        "`convnext.encoder.stages` block(s) [0]."
    ]


def test_a_layer_of_a_text_model_is_one_block(caplog):
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    model = T.BertForSequenceClassification(config)
    with caplog.at_level(logging.INFO, logger="hf_gradtools.freezing"):
        freeze_first_n_layers(model, 2)
    assert find_layer_stack(model).layer_meaning() == "one BertLayer (`bert.encoder.layer.<i>`)"
    assert "freezes `bert.encoder.layer` block(s) [0, 1]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_gradtools.freezing"):
        freeze_first_n_layers(model, 2)  # already frozen (a trainer given the frozen model): said once only
    assert "freezes" not in caplog.text


# ---- structures that are refused, never guessed ----


@pytest.mark.parametrize(
    "factory",
    [funnel, lambda: funnel((1, 1, 1), cls=T.FunnelModel)],  # blocks in a list of lists; with a decoder after
)
def test_funnel_is_refused_and_nothing_is_frozen(factory, tmp_path):
    model = factory()
    with pytest.raises(LayerStackNotFoundError) as raised:
        freeze_first_n_layers(model, 1)
    message = str(raised.value)
    assert message.startswith(f"The layers of {type(model).__name__} are not one list of blocks")
    assert "encoder.blocks` holds them in several lists" in message
    assert hinted_module(model, message)[0] is model.base_model.encoder.blocks[0][0]
    assert get_frozen_parameters(model) == []
    # Through GradTrainer: refused in the constructor, before anything is written.
    args = grad_args(tmp_path, freeze_first_n_layers=1)
    with pytest.raises(LayerStackNotFoundError, match="not one list of blocks"):
        GradTrainer(model=model, args=args)
    assert get_frozen_parameters(model) == [] and not (tmp_path / "out").exists()
    assert [name for name, _ in find_input_embeddings(model)] == [
        ("funnel." if hasattr(model, "funnel") else "") + "embeddings"
    ]


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)


class Stack(nn.Module):
    def __init__(self, n: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(n))


class EncoderAndDecoder(nn.Module):
    """Not an encoder-decoder model by its config (it has none), but an encoder stack and a bigger decoder one."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Stack(2, 4), Stack(3, 8)


class DecoderOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = Stack(3, 8)


def test_a_decoder_stack_after_an_encoders_is_refused():
    model = EncoderAndDecoder()
    with pytest.raises(LayerStackNotFoundError) as raised:
        freeze_first_n_layers(model, 1)
    message = str(raised.value)
    assert "`encoder.layers` (2 Block), `decoder.layers` (3 Block)" in message
    assert hinted_module(model, message)[0] is model.encoder.layers[0]
    assert get_frozen_parameters(model) == []
    # A decoder alone is the stack (OPT's `model.decoder.layers`).
    assert find_layer_stack(DecoderOnly()).name == "decoder.layers"


def test_blocks_split_over_a_list_of_lists_are_refused():
    class Groups(nn.Module):
        def __init__(self):
            super().__init__()
            self.groups = nn.ModuleList(nn.ModuleList(Block(4) for _ in range(2)) for _ in range(2))

    with pytest.raises(LayerStackNotFoundError, match=r"`groups` holds them in several lists .*`groups\.0` \(2"):
        find_layer_stack(Groups())
