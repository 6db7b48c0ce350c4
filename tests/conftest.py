"""Shared helpers: tiny models built from configs, tiny datasets, offline settings."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

T.logging.set_verbosity_error()
# Tiny models run fastest on one intra-op thread; spinning worker threads cost 10-50x on a busy 2-core machine.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*token_id must be.*")

VOCAB = 64
SEQ = 12
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_config(arch: str) -> T.PretrainedConfig:
    """A config of 3 layers, hidden size 16, for each architecture the freezing functions cover."""
    bert_like = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        **NO_DROPOUT,
    )
    configs = {
        "bert": lambda: T.BertConfig(**bert_like),
        "roberta": lambda: T.RobertaConfig(**{**bert_like, "max_position_embeddings": 70}),
        # Shaped like microsoft/deberta-v3-base: relative attention, no absolute positions, no token types.
        "deberta-v2": lambda: T.DebertaV2Config(
            **bert_like,
            relative_attention=True,
            position_biased_input=False,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_buckets=16,
            type_vocab_size=0,
        ),
        "distilbert": lambda: T.DistilBertConfig(
            vocab_size=VOCAB,
            dim=16,
            n_layers=3,
            n_heads=2,
            hidden_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
        ),
        "electra": lambda: T.ElectraConfig(**bert_like, embedding_size=8),
        "albert": lambda: T.AlbertConfig(**bert_like, embedding_size=8, classifier_dropout_prob=0.0),
        "gpt2": lambda: T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=3,
            n_head=2,
            n_positions=64,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        "llama": lambda: T.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=0,
            max_position_embeddings=64,
        ),
        "modernbert": lambda: T.ModernBertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            pad_token_id=0,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        "t5": lambda: T.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=3,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,
        ),
        "bart": lambda: T.BartConfig(
            vocab_size=VOCAB,
            d_model=16,
            encoder_layers=3,
            decoder_layers=3,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            pad_token_id=1,
            eos_token_id=2,
            bos_token_id=0,
        ),
    }
    return configs[arch]()


ARCHS = [
    "bert",
    "roberta",
    "deberta-v2",
    "distilbert",
    "electra",
    "albert",
    "gpt2",
    "llama",
    "modernbert",
    "t5",
    "bart",
]


def save_per_rank_and_end(results, prefix: str) -> None:
    """A torchrun worker's last step: `results` to PREFIX.<rank>.pt, once every process has got this far, then the
    process group destroyed."""
    import torch.distributed as dist

    torch.save(results, f"{prefix}.{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


def exit_without_teardown() -> None:
    """End a torchrun worker at once, after its process group is destroyed and its files are written.

    Interpreter shutdown can hang on gloo's threads now and then (seen once in hundreds of runs): the test would
    then wait for its timeout. Nothing is left to clean up at this point, so skip that shutdown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(cwd, worker: str, *args: str, processes: int = 2) -> None:
    """Run `tests/helpers/<worker>` under torchrun (`processes` on this machine, one thread each) in `cwd`; fail with
    the end of its stderr if it fails."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    path = os.path.join(ROOT, "tests", "helpers", worker)
    done = subprocess.run([*launch, path, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def folder_contents(folder: str) -> dict[str, bytes]:
    """Every file under `folder`, by path relative to it, with its bytes: what a refused operation must not change."""
    contents = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.isfile(path):  # a pipe, or a link to nothing: its kind, not its bytes
                contents[os.path.relpath(path, folder)] = f"<{os.lstat(path).st_mode:o}>".encode()
                continue
            with open(path, "rb") as f:
                contents[os.path.relpath(path, folder)] = f.read()
    return contents


def tiny_wav2vec2_config(**overrides) -> T.Wav2Vec2Config:
    """A 2-layer Wav2Vec2 of hidden size 16 over 400-sample inputs, without dropout or time masking."""
    settings = dict(
        vocab_size=12,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(4, 4),
        conv_kernel=(8, 4),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
        layerdrop=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        pad_token_id=0,
    )
    return T.Wav2Vec2Config(**{**settings, **overrides})


def tiny_classifier(arch: str = "bert", seed: int = 0, num_labels: int = 2) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config.num_labels = num_labels
    return T.AutoModelForSequenceClassification.from_config(config)


def token_rows(n: int, seed: int = 1, seq: int = SEQ, eos: int = 2) -> list[list[int]]:
    """Token ids in [3, VOCAB) that end with `eos`, as the T5 and BART classification heads require."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    ids[:, -1] = eos
    return ids.tolist()


def classification_data(n: int = 16, seed: int = 1, eos: int = 2, num_labels: int = 2):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, num_labels, (n,), generator=g).tolist()
    return Dataset.from_dict({"input_ids": token_rows(n, seed, eos=eos), "labels": labels})


def eos_of(arch: str) -> int:
    return {"t5": 1}.get(arch, 2)


def grad_args(tmp_path, **overrides):
    from hf_gradtools import GradTrainingArguments

    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    defaults.update(overrides)
    return GradTrainingArguments(**defaults)


@pytest.fixture
def args_factory(tmp_path):
    return lambda **kw: grad_args(tmp_path, **kw)


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny models: on a busy shared machine, spinning worker threads cost 10-50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
