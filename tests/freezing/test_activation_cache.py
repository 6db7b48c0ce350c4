"""The frozen-activation cache gives what the model gives without it, and skips the frozen prefix when it serves."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
import transformers as T

from hf_gradtools import (
    GradTrainer,
    GradTrainingArguments,
    freeze,
    freeze_embeddings,
    freeze_first_n_layers,
)
from hf_gradtools.freezing import activation_cache
from hf_gradtools.freezing.activation_cache import FrozenActivationCache
from hf_gradtools.layout import find_input_embeddings, find_layer_stack
from hf_gradtools.schedules import set_frozen_eval_mode
from tests.conftest import VOCAB, classification_data, grad_args, tiny_classifier, tiny_config, torchrun

pytestmark = pytest.mark.usefixtures("single_thread")

HIDDEN = 32
DROPOUT = 0.1  # in the trainable blocks: the cache must leave their random numbers as they were
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "resid_pdrop")
DROPOUTS += ("embd_pdrop", "attn_pdrop", "mlp_dropout", "embedding_dropout")
LIKE = {"deberta-v3": "deberta-v2", "xlm-roberta": "roberta", "mpnet": "bert", "qwen2": "llama"}  # built from these


def config(arch: str) -> T.PretrainedConfig:
    """The conftest's 3-layer config of `arch`, at hidden size 32 with dropout on; and the architectures the cache
    supports beyond those: XLM-R, MPNet, Qwen2, and DeBERTa-v2 shaped like deberta-v2-xlarge (absolute positions
    too, token types, the convolution after block 0; "deberta-v3" is the conftest's relative-only one)."""
    base = tiny_config(LIKE.get(arch, arch))
    if arch in ("xlm-roberta", "mpnet", "qwen2"):
        cls = {"xlm-roberta": T.XLMRobertaConfig, "mpnet": T.MPNetConfig, "qwen2": T.Qwen2Config}[arch]
        base = cls(**{k: v for k, v in base.to_diff_dict().items() if k not in ("model_type", "transformers_version")})
    if arch == "deberta-v2":
        base.update(dict(position_biased_input=True, conv_kernel_size=3, type_vocab_size=2, share_att_key=False))
    if arch in ("roberta", "xlm-roberta", "mpnet"):
        base.max_position_embeddings = 70
    if arch == "modernbert":
        base.local_attention = 4  # a sliding window shorter than the rows
    base.hidden_size = HIDDEN
    if hasattr(base, "pooler_hidden_size"):
        base.pooler_hidden_size = HIDDEN
    if hasattr(base, "head_dim"):
        base.head_dim = HIDDEN // base.num_attention_heads
    for name in DROPOUTS:
        if hasattr(base, name):
            setattr(base, name, DROPOUT)
    return base


ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "mpnet", "deberta-v3", "deberta-v2", "distilbert"]
ENCODERS += ["modernbert"]
DECODERS = ["gpt2", "llama", "qwen2"]


def frozen_model(arch: str, k: int, head=T.AutoModelForSequenceClassification, seed: int = 0) -> T.PreTrainedModel:
    """A tiny `arch` model with its embeddings and first `k` blocks frozen (and what those blocks share), in train
    mode with the frozen modules in eval mode, as `frozen_eval_mode` leaves it."""
    torch.manual_seed(seed)
    cfg = config(arch)
    cfg.num_labels = 3
    model = head.from_config(cfg)
    freeze_prefix(model, k)
    return model


def freeze_prefix(model: T.PreTrainedModel, k: int) -> None:
    freeze_embeddings(model)
    freeze_first_n_layers(model, k)
    stack_parent = model.get_submodule(find_layer_stack(model).name.rpartition(".")[0])
    for name in ("rel_embeddings", "LayerNorm", "conv", "relative_attention_bias"):  # used by the frozen blocks
        if isinstance(getattr(stack_parent, name, None), torch.nn.Module):
            freeze(getattr(stack_parent, name))
    train_mode(model)


def train_mode(model: T.PreTrainedModel) -> None:
    model.train()
    set_frozen_eval_mode(model)
    if hasattr(model, "transformer") and hasattr(model.transformer, "drop"):
        model.transformer.drop.eval()  # GPT-2's dropout after its (frozen) embeddings: parameterless, left training


def rows(n: int = 6, seed: int = 3, low: int = 3) -> list[list[int]]:
    """`n` token rows of lengths 3 to 3 + n - 1, ids in [low, VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (3 + i,), generator=g).tolist() for i in range(n)]


def batch_of(examples: list[list[int]], length: int, pad: int, types: bool = False, lm: bool = False) -> dict:
    ids = torch.full((len(examples), length), pad)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for i, row in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if types:
        batch["token_type_ids"] = (torch.arange(length) >= 2).long().expand(len(examples), -1) * mask
    if lm:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        batch["labels"] = torch.tensor([sum(row) % 3 for row in examples])
    return batch


def pad_id(model: T.PreTrainedModel) -> int:
    pad = model.config.pad_token_id
    return 1 if model.config.model_type == "mpnet" else (0 if pad is None else pad)


def step(model: T.PreTrainedModel, batch: dict, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Loss, logits (unpadded positions of token outputs) and the trainable parameters' gradients of one
    forward and backward, with dropout seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    logits = out.logits.detach()
    if logits.dim() == 3:
        logits = logits[batch["attention_mask"].bool()]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), logits, grads


def prefix_calls(model: T.PreTrainedModel, k: int) -> list[int]:
    """Forward hooks on the embedding modules (and their children) and the first `k` blocks; a list that counts."""
    count = [0]
    modules = [m for _, e in find_input_embeddings(model) for m in e.modules()]
    modules += [m for block in find_layer_stack(model).blocks[:k] for m in block.modules()]
    for module in modules:
        module.register_forward_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    return count


def assert_same(a, b, tol: float = 1e-5) -> None:
    loss_a, logits_a, grads_a = a
    loss_b, logits_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, atol=tol, rtol=tol)
    torch.testing.assert_close(logits_a, logits_b, atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=tol, rtol=tol, msg=name)


def check_served_equals_uncached(
    arch: str, k: int, head=T.AutoModelForSequenceClassification, lm: bool = False, device="cpu", storage="cpu"
):
    model = frozen_model(arch, k, head).to(device)
    reference = frozen_model(arch, k, head).to(device)
    pad = pad_id(model)
    types = arch in ("bert", "electra", "deberta-v2")
    examples = rows(low=3)
    first = batch_of(examples, 10, pad, types, lm)  # kept
    again = batch_of(examples[::-1], 13, pad, types, lm)  # the same examples, another order and pad length
    first, again = ({key: value.to(device) for key, value in b.items()} for b in (first, again))
    expected = step(reference, again)
    cache = FrozenActivationCache.from_model(model, k, budget_bytes=10**8, device=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing prevents serving here
        with cache.serving(first):
            step(model, first)
        calls = prefix_calls(model, k)
        with cache.serving(again):
            served = step(model, again)
    assert calls[0] == 0  # neither the embeddings nor the frozen blocks ran
    assert cache.stats()["activation_cache_hit_rate"] == 0.5
    assert_same(served, expected)
    return model, cache


@pytest.mark.parametrize("arch", ENCODERS + DECODERS)
def test_served_batch_equals_uncached(arch):
    check_served_equals_uncached(arch, 2)


@pytest.mark.parametrize("arch", ["bert", "deberta-v2", "mpnet", "modernbert", "llama"])
def test_every_block_frozen(arch):
    check_served_equals_uncached(arch, 3)


@pytest.mark.parametrize("arch", DECODERS)
def test_causal_lm_equals_uncached(arch):
    check_served_equals_uncached(arch, 1, T.AutoModelForCausalLM, lm=True)


@pytest.mark.parametrize("arch", ["bert", "deberta-v2", "mpnet", "modernbert", "gpt2", "llama"])
def test_examples_kept_at_other_depths_are_carried_on_together(arch):
    """Two examples kept at each of depths 1, 2 and 3 (the prefix grew between them) in one micro-batch: only the
    blocks past the shallowest depth run, the result is the uncached one, and all six are then kept at depth 3."""
    model, reference = frozen_model(arch, 3), frozen_model(arch, 3)
    pad = pad_id(model)
    examples = rows(low=3)
    cache = FrozenActivationCache.from_model(model, 1, budget_bytes=10**8)
    for k, pair in zip((1, 2, 3), (examples[:2], examples[2:4], examples[4:]), strict=True):
        cache.set_prefix(k)
        with cache.serving(batch_of(pair, 9, pad)):
            step(model, batch_of(pair, 9, pad))
    assert sorted(entry.depth for entry in cache._entries.values()) == [1, 1, 2, 2, 3, 3]
    blocks = find_layer_stack(model).blocks
    block_calls = [0, 0, 0]
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *a, i=i: block_calls.__setitem__(i, block_calls[i] + 1))
    prefix = prefix_calls(model, 0)  # the embeddings
    mixed = batch_of([examples[i] for i in (4, 0, 2, 5, 1, 3)], 12, pad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with cache.serving(mixed):
            served = step(model, mixed)
    assert_same(served, step(reference, mixed))
    assert prefix[0] == 0 and block_calls == [0, 1, 1]  # blocks 1 and 2 ran once, for the shallower examples
    assert sorted(entry.depth for entry in cache._entries.values()) == [3] * 6
    with cache.serving(mixed):
        again = step(model, mixed)
    assert_same(again, served)
    assert block_calls == [0, 1, 1]
    assert cache.stats()["activation_cache_hit_rate"] == pytest.approx(12 / 18)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("storage", ["cpu", "cuda"])
@pytest.mark.parametrize("arch", ["bert", "deberta-v2", "llama"])
def test_on_cuda_with_states_kept_on_either_device(arch, storage):
    torch.backends.cuda.matmul.allow_tf32 = False
    _, cache = check_served_equals_uncached(arch, 2, device="cuda", storage=storage)
    assert {entry.states.device.type for entry in cache._entries.values()} == {storage}


def test_outside_serving_the_model_is_untouched():
    model, cache = check_served_equals_uncached("bert", 2)
    reference = frozen_model("bert", 2)
    reference.load_state_dict(model.state_dict())
    batch = batch_of(rows(), 10, 0)
    calls = prefix_calls(model, 2)
    for m in (model, reference):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=0, rtol=0)
    assert calls[0] > 0
    assert not model._forward_pre_hooks and all(not b._forward_pre_hooks for b in find_layer_stack(model).blocks)


def test_doctest():
    result = doctest.testmod(activation_cache, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


# --- training runs ----------------------------------------------------------------------------------------------


class CachingTrainer(GradTrainer):
    """GradTrainer with each training micro-batch's forward and backward inside `cache.serving`."""

    cache: FrozenActivationCache | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.cache is None:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.cache.serving(inputs):
            return super().training_step(model, inputs, num_items_in_batch)


class EpochCalls(T.TrainerCallback):
    """The prefix's forward calls in each epoch; `at_epoch` runs at the start of the epochs it names."""

    def __init__(self, counters: dict[str, list[int]], at_epoch=None):
        self.counters, self.at_epoch, self.per_epoch = counters, at_epoch or {}, []

    def on_epoch_begin(self, args, state, control, **kwargs):
        for counter in self.counters.values():
            counter[0] = 0
        if round(state.epoch) in self.at_epoch:
            self.at_epoch[round(state.epoch)]()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.per_epoch.append({name: counter[0] for name, counter in self.counters.items()})


def train(
    tmp_path,
    arch: str,
    cache: bool,
    budget: float = 1e8,
    grow: bool = False,
    epochs: int = 3,
    settings: bool = False,
    **fields,
):
    """3 epochs of a shuffled, dynamically padded run with dropout; the embeddings and block 0 (and block 1,
    from the start or, with `grow`, from the second epoch) frozen; `fields`: more `GradTrainingArguments`."""
    from datasets import Dataset

    from tests.trainer.test_dropin import tiny_tokenizer

    causal = arch in DECODERS
    head = T.AutoModelForCausalLM if causal else T.AutoModelForSequenceClassification
    torch.manual_seed(0)
    cfg = config(arch)
    cfg.num_labels = 3
    model = head.from_config(cfg)
    examples = rows(16, seed=5) + rows(8, seed=6)
    data = {"input_ids": examples} if causal else {"input_ids": examples, "labels": [sum(r) % 3 for r in examples]}
    tokenizer = tiny_tokenizer()
    collator = (
        T.DataCollatorForLanguageModeling(tokenizer, mlm=False) if causal else T.DataCollatorWithPadding(tokenizer)
    )
    k = 1 if grow else 2
    args = GradTrainingArguments(
        str(tmp_path / f"{arch}-{cache}-{grow}"),
        per_device_train_batch_size=4,
        num_train_epochs=epochs,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **fields,
        freeze_embeddings=True,
        freeze_first_n_layers=k,
        frozen_eval_mode=True,
        cache_frozen_activations=cache and settings,
        frozen_activation_cache_gb=budget / 1e9,
    )
    trainer = CachingTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), data_collator=collator)
    if cache and not settings:
        trainer.cache = FrozenActivationCache.from_model(model, k, budget_bytes=budget)
    blocks = find_layer_stack(model).blocks
    counters = {"embeddings": prefix_calls(model, 0), "block 0": [0], "block 1": [0]}
    for i in (0, 1):
        blocks[i].register_forward_hook(lambda *a, c=counters[f"block {i}"]: c.__setitem__(0, c[0] + 1))

    def freeze_block_1():
        freeze(blocks[1])
        if trainer.cache is not None:
            trainer.cache.set_prefix(2)  # `cache_frozen_activations` follows the frozen blocks by itself

    calls = EpochCalls(counters, {1: freeze_block_1} if grow else {})
    trainer.add_callback(calls)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    if settings and cache:
        trainer.logs = [log for log in trainer.state.log_history if "loss" in log]
        return model, losses, calls.per_epoch, trainer
    return model, losses, calls.per_epoch, trainer.cache


def assert_same_run(a, b) -> None:
    model_a, losses_a, _, _ = a
    model_b, losses_b, _, _ = b
    assert len(losses_a) == len(losses_b) == 18
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_b), atol=1e-5, rtol=1e-5)
    params_b = dict(model_b.named_parameters())
    for name, param in model_a.named_parameters():
        torch.testing.assert_close(param, params_b[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_training_run_equals_uncached(tmp_path, arch):
    plain = train(tmp_path, arch, cache=False)
    cached = train(tmp_path, arch, cache=True)
    assert_same_run(cached, plain)
    epochs = cached[2]
    assert all(epochs[0][name] > 0 for name in epochs[0])  # the first epoch computes and keeps every example
    assert epochs[1] == epochs[2] == {"embeddings": 0, "block 0": 0, "block 1": 0}
    assert plain[2][2]["block 1"] > 0
    assert cached[3].stats()["activation_cache_hit_rate"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("grow", [False, True])
def test_cache_frozen_activations_in_grad_trainer_equals_uncached(tmp_path, grow):
    plain = train(tmp_path, "bert", cache=False, grow=grow)
    cached = train(tmp_path, "bert", cache=True, grow=grow, settings=True)
    assert_same_run(cached, plain)
    assert cached[2][2] == {"embeddings": 0, "block 0": 0, "block 1": 0}  # epoch 3 runs no frozen block
    logs = cached[3].logs
    assert [log["activation_cache_hit_rate"] for log in logs[6:]] == [1.0] * 12  # epochs 2 and 3: every example
    assert all(log["activation_cache_hit_rate"] == 0.0 for log in logs[:6]) and logs[-1]["activation_cache_gb"] > 0


@pytest.mark.parametrize(
    ("frozen", "said"),
    [({}, 1), ({"freeze_first_n_layers": 1}, 1), ({"freeze_first_n_layers": 1, "freeze_embeddings": True}, 0)],
)
def test_a_cache_with_nothing_frozen_says_so(tmp_path, frozen, said):
    args = grad_args(tmp_path, max_steps=1, cache_frozen_activations=True, frozen_eval_mode=True, **frozen)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "has nothing to serve" in str(w.message)]
    assert len(messages) == said  # block 0 frozen alone is no prefix either: the embeddings feed it
    assert all("`freeze_embeddings`" in message for message in messages)


def test_growing_prefix_equals_uncached(tmp_path):
    plain = train(tmp_path, "bert", cache=False, grow=True)
    cached = train(tmp_path, "bert", cache=True, grow=True)
    assert_same_run(cached, plain)
    first, second, third = cached[2]
    assert first["block 0"] > 0 and first["block 1"] > 0
    assert second["block 0"] == 0 and second["block 1"] > 0  # carried on from block 1 by running block 1 only
    assert third == {"embeddings": 0, "block 0": 0, "block 1": 0}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_with_the_cache_equal_two_without(tmp_path):
    """Each process keeps the examples it computes and shares them with the other after every optimizer step. In
    order or shuffled (the sampler deals the examples out anew each epoch), epochs 2 and 3 are served whole on
    both processes, and the results are those without the cache."""
    prefix = str(tmp_path / "out" / "result")
    torchrun(tmp_path, "ddp_cache.py", prefix)
    ranks = [torch.load(f"{prefix}.{rank}.pt") for rank in (0, 1)]
    for result in ranks:
        for sampling in ("sequential", "random"):
            plain, cached = result[sampling, False], result[sampling, True]
            assert len(cached["losses"]) == 9  # 24 examples, 2 processes x batch 4, 3 epochs
            torch.testing.assert_close(cached["losses"], plain["losses"], atol=1e-5, rtol=1e-5)
            for name, param in plain["params"].items():
                torch.testing.assert_close(cached["params"][name], param, atol=1e-5, rtol=1e-5, msg=name)
        for sampling in ("sequential", "random"):
            cached = result[sampling, True]
            assert all(calls > 0 for calls in cached["epochs"][0].values())  # epoch 1 computes its examples
            assert cached["epochs"][1] == cached["epochs"][2] == {"embeddings": 0, "block 0": 0, "block 1": 0}
            assert cached["hit_rates"] == [0.0] * 3 + [1.0] * 6
    for name, param in ranks[0]["random", True]["params"].items():
        assert torch.equal(ranks[1]["random", True]["params"][name], param), name


def test_budget_reached_warns_once_and_computes_the_rest(tmp_path):
    plain = train(tmp_path, "bert", cache=False)
    with pytest.warns(UserWarning, match="budget of 3e-05 GB is reached") as caught:
        cached = train(tmp_path, "bert", cache=True, budget=30_000)
    assert sum("budget" in str(w.message) for w in caught) == 1
    assert_same_run(cached, plain)
    cache = cached[3]
    assert cache.budget_exceeded_warned and 0 < len(cache) < 24 and cache.size_bytes <= 30_000
    assert cached[2][2]["block 0"] > 0  # the batches with an example not kept are computed


# --- refusals and the conditions that keep a micro-batch from being served -------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        lambda: T.AlbertForSequenceClassification(T.AlbertConfig(**tiny_kwargs("albert"))),
        lambda: T.DebertaForSequenceClassification(T.DebertaConfig(**tiny_kwargs("deberta"))),
        lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=2)),
    ],
    ids=["albert", "deberta", "t5"],
)
def test_unknown_architecture_is_refused_by_name(model):
    model = model()
    with pytest.raises(ValueError, match=f"{type(model).__name__} \\(model_type '{model.config.model_type}'\\)"):
        FrozenActivationCache.from_model(model, 1, budget_bytes=10**8)


def tiny_kwargs(arch: str) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def test_look_alike_and_bad_arguments_are_refused():
    model = frozen_model("bert", 1)
    model.config.model_type = "llama"
    with pytest.raises(ValueError, match="expects LlamaDecoderLayer blocks in a llama model, but .* has BertLayer"):
        FrozenActivationCache.from_model(model, 1, budget_bytes=10**8)
    model.config.model_type = "bert"
    with pytest.raises(ValueError, match="`num_frozen_blocks`=4 but BertForSequenceClassification has 3 blocks"):
        FrozenActivationCache.from_model(model, 4, budget_bytes=10**8)
    with pytest.raises(ValueError, match="`budget_bytes` must be a positive number of bytes, got 0"):
        FrozenActivationCache.from_model(model, 1, budget_bytes=0)
    cache = FrozenActivationCache.from_model(model, 1, budget_bytes=10**8)
    with pytest.raises(ValueError, match="`num_frozen_blocks` must be an integer from 0 to 3, got 1.5"):
        cache.set_prefix(1.5)


def served(model, cache, batch, k: int) -> tuple[bool, tuple]:
    """Keep `batch`, run it again inside `serving`: whether the prefix was skipped, and the step's results."""
    with cache.serving(batch):
        step(model, batch)
    calls = prefix_calls(model, k)
    with cache.serving(batch):
        result = step(model, batch)
    return calls[0] == 0, result


@pytest.mark.parametrize(
    "arch, spoil, message",
    [
        ("gpt2", lambda m: m.transformer.drop.train(), "`transformer.drop` \\(Dropout\\) is in train mode"),
        ("deberta-v3", lambda m: m.deberta.encoder.rel_embeddings.requires_grad_(True), "rel_embeddings.weight` is"),
        ("bert", lambda m: m.bert.encoder.layer[1].train(), "`bert.encoder.layer.1` \\(BertLayer\\) is in train"),
        ("bert", lambda m: m.bert.embeddings.requires_grad_(True), "`bert.embeddings.word_embeddings.weight` is tr"),
    ],
    ids=["gpt2-dropout", "deberta-rel-embeddings", "train-mode-block", "trainable-embeddings"],
)
def test_a_prefix_that_is_not_fixed_is_computed(arch, spoil, message):
    model, reference = frozen_model(arch, 2), frozen_model(arch, 2)
    for m in (model, reference):
        spoil(m)
    batch = batch_of(rows(), 10, pad_id(model))
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with pytest.warns(UserWarning, match=message):
        skipped, result = served(model, cache, batch, 2)
    assert not skipped and len(cache) == 0
    assert_same(result, step(reference, batch))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b["labels"].__setitem__((0, -1), 1), "token labels at or next to padded positions are not -100"),
        (lambda b: b.__setitem__("head_mask", torch.ones(2, 2)), "the batch holds `head_mask`"),
        (lambda b: b.__setitem__("output_hidden_states", True), "`output_hidden_states` asks for"),
    ],
    ids=["labels-at-padding", "unknown-input", "hidden-states"],
)
def test_a_batch_the_cache_cannot_serve_is_computed(change, message):
    model = frozen_model("bert", 2, T.AutoModelForTokenClassification)
    batch = token_labels(batch_of(rows(), 10, 0, lm=True))
    change(batch)
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with pytest.warns(UserWarning, match=message):
        skipped, _ = served(model, cache, batch, 2)
    assert not skipped and len(cache) == 0


def token_labels(batch: dict) -> dict:
    batch["labels"] = torch.where(batch["labels"] >= 0, batch["labels"] % 3, -100)
    return batch


def test_token_labels_at_unpadded_positions_only_are_served():
    model = frozen_model("bert", 2, T.AutoModelForTokenClassification)
    reference = frozen_model("bert", 2, T.AutoModelForTokenClassification)
    batch = token_labels(batch_of(rows(), 10, 0, lm=True))
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    skipped, result = served(model, cache, batch, 2)
    assert skipped
    assert_same(result, step(reference, batch))


def test_a_batch_with_a_new_example_is_computed_and_keeps_it():
    model, reference = frozen_model("roberta", 2), frozen_model("roberta", 2)
    examples = rows(8)
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with cache.serving(batch_of(examples[:4], 8, 1)):
        step(model, batch_of(examples[:4], 8, 1))
    mixed = batch_of(examples[2:6], 9, 1)
    calls = prefix_calls(model, 2)
    with cache.serving(mixed):
        assert_same(step(model, mixed), step(reference, mixed))
    assert calls[0] > 0 and len(cache) == 6
    calls[0] = 0
    later = batch_of(examples[5::-1], 11, 1)
    with cache.serving(later):
        assert_same(step(model, later), step(reference, later))
    assert calls[0] == 0
    assert cache.stats()["activation_cache_hit_rate"] == pytest.approx(6 / 14)


def test_left_padding_positions_are_part_of_the_example():
    model, reference = frozen_model("llama", 2), frozen_model("llama", 2)
    examples = rows()

    def left_padded(order, length):
        batch = batch_of([r for r in order], length, 0)
        for key in ("input_ids", "attention_mask"):
            batch[key] = torch.stack([row.roll(length - len(r)) for row, r in zip(batch[key], order, strict=True)])
        return batch

    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    first = left_padded(examples, 10)
    with cache.serving(first):
        step(model, first)
    longer = left_padded(examples, 12)  # other positions for every token (Llama counts them from the row start)
    with cache.serving(longer):
        assert_same(step(model, longer), step(reference, longer))
    assert cache.stats()["activation_cache_hit_rate"] == 0.0 and len(cache) == 12
    shuffled = left_padded(examples[::-1], 12)
    calls = prefix_calls(model, 2)
    with cache.serving(shuffled):
        assert_same(step(model, shuffled), step(reference, shuffled))
    assert calls[0] == 0


def left_padded(batch: dict) -> dict:
    """`batch` with its padding moved to the start of each row (and its token labels with it)."""
    lengths = batch["attention_mask"].sum(1)
    out = dict(batch)
    for key in ("input_ids", "attention_mask") + (("labels",) if batch["labels"].dim() == 2 else ()):
        out[key] = torch.stack(
            [row.roll(int(batch[key].shape[1] - n)) for row, n in zip(batch[key], lengths, strict=True)]
        )
    return out


def with_an_empty_row(batch: dict) -> dict:
    out = {key: value.clone() for key, value in batch.items()}
    out["attention_mask"][0] = 0
    out["input_ids"][0] = 0
    return out


@pytest.mark.parametrize(
    "arch, make, message",
    [
        ("bert", left_padded, "a row's first position is padding"),
        ("modernbert", left_padded, "a row's first position is padding"),
        ("distilbert", left_padded, "a row's first position is padding"),
        ("bert", with_an_empty_row, "a row is all padding"),
        ("llama", with_an_empty_row, "a row is all padding"),
    ],
)
def test_a_head_that_would_read_padding_is_computed(arch, make, message):
    """The padded positions' outputs are not the uncached ones: a sequence head that reads the first position of a
    left-padded row, or any head on an all-padding row, is computed, with the uncached result."""
    model, reference = frozen_model(arch, 2), frozen_model(arch, 2)
    batch = make(batch_of(rows(), 10, pad_id(model)))
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with pytest.warns(UserWarning, match=message):
        skipped, result = served(model, cache, batch, 2)
    assert not skipped and len(cache) == 0
    assert_same(result, step(reference, batch))


def test_a_decoder_head_without_a_pad_token_reads_the_last_position():
    """Without `pad_token_id` the decoders' sequence head reads the last position: a row padded at its end is
    computed; padded at its start (the last position is a token) it is served, with the uncached result."""
    model, reference = frozen_model("llama", 2), frozen_model("llama", 2)
    for m in (model, reference):
        m.config.pad_token_id = None
    right = batch_of(rows()[:1], 10, 0)  # one row: the head refuses a larger batch without a pad token
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with pytest.warns(UserWarning, match="`pad_token_id` is not set, so the head reads the last position"):
        skipped, result = served(model, cache, right, 2)
    assert not skipped
    assert_same(result, step(reference, right))
    left = left_padded(right)
    skipped, result = served(model, cache, left, 2)
    assert skipped
    assert_same(result, step(reference, left))


class LastLayersClassifier(T.BertPreTrainedModel):
    """A user's head over the mean of the last two layers' first token: it asks its encoder for every layer."""

    def __init__(self, config):
        super().__init__(config)
        self.bert = T.BertModel(config, add_pooling_layer=False)
        self.head = torch.nn.Linear(config.hidden_size, 3)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits = self.head(torch.stack(out.hidden_states[-2:]).mean(0)[:, 0])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return T.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)


def test_a_head_that_asks_for_every_layer_is_computed():
    def build():
        torch.manual_seed(0)
        model = LastLayersClassifier(config("bert"))
        freeze_prefix(model, 2)
        return model

    model, reference = build(), build()
    batch = batch_of(rows(), 10, 0)
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with pytest.warns(UserWarning, match="`BertModel` is called with `output_hidden_states`"):
        skipped, result = served(model, cache, batch, 2)
    assert not skipped
    assert cache.stats()["activation_cache_hit_rate"] == 0.0
    assert_same(result, step(reference, batch))


def test_examples_are_recognised_by_what_the_model_is_called_with():
    """A `compute_loss` may change the batch before calling the model (word dropout, say): the examples are those
    of the call, not of the trainer's batch."""
    model, reference = frozen_model("bert", 2), frozen_model("bert", 2)
    batch = batch_of(rows(), 10, 0)
    changed = {**batch, "input_ids": batch["input_ids"].where(batch["input_ids"] % 4 > 0, 3), "head_mask": None}
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with cache.serving(batch):
        step(model, batch)
    calls = prefix_calls(model, 2)
    with cache.serving(batch):  # the trainer's batch, its examples kept; the model gets others
        result = step(model, changed)
    assert calls[0] > 0
    assert_same(result, step(reference, changed))
    before = calls[0]
    with cache.serving(batch):  # kept now, and served (an input given as None changes nothing)
        result = step(model, changed)
    assert calls[0] == before and cache.stats()["activation_cache_hit_rate"] == pytest.approx(1 / 3)
    assert_same(result, step(reference, changed))


def test_frozen_weights_changed_in_place_drop_the_kept_states():
    model, reference = frozen_model("bert", 2), frozen_model("bert", 2)
    batch = batch_of(rows(), 10, 0)
    cache = FrozenActivationCache.from_model(model, 2, budget_bytes=10**8)
    with cache.serving(batch):
        step(model, batch)
    positions = model.bert.embeddings.position_ids
    positions.copy_(positions.clone())  # a constant buffer written again, unchanged (as `Trainer.train()` does)
    skipped, _ = served(model, cache, batch, 2)
    assert skipped
    with torch.no_grad():
        for m in (model, reference):
            m.bert.encoder.layer[0].output.dense.weight.mul_(1.5)
    skipped, result = served(model, cache, batch, 2)
    assert skipped  # computed once more after the change, then served from the new states
    assert_same(result, step(reference, batch))
    assert cache.stats()["activation_cache_hit_rate"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_and_states_kept_in_their_dtype(reentrant):
    model, reference = frozen_model("bert", 1), frozen_model("bert", 1)
    for m in (model, reference):
        m.double()
        m.activation_checkpointing_enable({"use_reentrant": reentrant})
        train_mode(m)
    batch = batch_of(rows(), 10, 0)
    cache = FrozenActivationCache.from_model(model, 1, budget_bytes=10**8)
    skipped, result = served(model, cache, batch, 1)
    assert skipped and {entry.states.dtype for entry in cache._entries.values()} == {torch.float64}
    assert_same(result, step(reference, batch), tol=1e-10)


@pytest.mark.parametrize("p", [0.1, 0.0])
def test_a_live_dropout_on_the_frozen_embeddings_is_said_at_train_begin(p):
    """GPT-2's `drop` (after its embeddings, parameterless) stays training under `frozen_eval_mode`: with it at
    p > 0 no micro-batch can be served, and the warning comes before the first step, naming the fix."""
    from types import SimpleNamespace

    cfg = tiny_config("gpt2")
    cfg.embd_pdrop = p
    model = T.GPT2LMHeadModel(cfg)
    freeze_embeddings(model)
    freeze_first_n_layers(model, 1)
    component = activation_cache.CacheFrozenActivations(1e8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        component.on_train_begin(SimpleNamespace(model=model))
    said = [str(w.message) for w in caught if "cannot serve any micro-batch" in str(w.message)]
    if p:
        assert len(said) == 1 and "dropout `transformer.drop` (p=0.1)" in said[0] and "`embd_pdrop=0.0`" in said[0]
    else:
        assert not said


def test_a_cache_whose_embeddings_automatic_freezing_never_freezes_says_so():
    """Tied to the output head, the embeddings stay trainable under `auto_freeze`: nothing can be served."""
    from types import SimpleNamespace

    cfg = tiny_config("gpt2")
    cfg.embd_pdrop, cfg.tie_word_embeddings = 0.1, True
    component = activation_cache.CacheFrozenActivations(1e8, prefix_grows=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        component.on_train_begin(SimpleNamespace(model=T.GPT2LMHeadModel(cfg)))
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "nothing to serve" in said[0] and "output head's lm_head.weight too (tied)" in said[0]
    cfg.tie_word_embeddings = False  # untied, the embeddings can freeze: only the dropout is in the way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        component.on_train_begin(SimpleNamespace(model=T.GPT2LMHeadModel(cfg)))
    said = [str(w.message) for w in caught if "serve" in str(w.message)]
    assert len(said) == 1 and "cannot serve any micro-batch" in said[0] and "`transformer.drop` (p=0.1)" in said[0]
