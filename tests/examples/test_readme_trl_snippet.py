"""The README's TRL snippet (`GradTrainerMixin` on `SFTTrainer`), run as written on a tiny Llama, on this CPU."""

from __future__ import annotations

import os
import runpy

import pytest
import torch
import transformers as T

from tests.conftest import VOCAB, tiny_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = pytest.mark.usefixtures("single_thread")


def readme_trl_snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("```python\nfrom dataclasses import dataclass\n\nimport trl")
    return text[start + len("```python\n") : text.index("\n```", start)]


def test_the_trl_snippet_trains_as_written(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_config("llama"))
    data = Dataset.from_dict({"text": [" ".join(f"w{(i * j) % 50}" for j in range(3 + i % 5)) for i in range(16)]})

    monkeypatch.chdir(tmp_path)  # the snippet trains into "out"
    path = tmp_path / "snippet.py"
    path.write_text(readme_trl_snippet() + "\ntrainer.train()\n", encoding="utf-8")
    names = runpy.run_path(str(path), init_globals={"model": model, "data": data, "tokenizer": tokenizer})

    trainer = names["trainer"]
    assert trainer.state.global_step == 3  # 16 rows, batches of 8, accumulation 4: one step per epoch, 3 epochs
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen
    assert {n for n in frozen if ".layers." in n} == {
        n for n, _ in model.named_parameters() if n.startswith(("model.layers.0.", "model.layers.1."))
    }
    assert not any(n.startswith("model.layers.2.") for n in frozen)
    assert os.path.isfile(tmp_path / "out" / "frozen_parameters.json")
