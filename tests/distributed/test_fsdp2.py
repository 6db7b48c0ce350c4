"""FSDP2 (`fully_shard`, 2 gloo CPU processes): the trainer's clipping and snapshot step in norms 1, inf, 3 and 2
gives the global norms, snapshots of them under the unsharded names, and the same training as one unsharded
process."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_gradtools import load_grad_snapshots

HELPERS = os.path.join(os.path.dirname(__file__), "..", "helpers")
WORKER = os.path.join(HELPERS, "fsdp2_clip.py")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def unsharded_run(out_file: str) -> None:
    spec = importlib.util.spec_from_file_location("fsdp2_clip", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out_file)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fully_shard_clipping_equals_one_process(tmp_path, monkeypatch):
    two, one = str(tmp_path / "two.pt"), str(tmp_path / "one.pt")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, two]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    unsharded_run(one)
    sharded, plain = torch.load(two), torch.load(one)
    assert [s["norm_type"] for s in sharded["steps"]] == [1.0, math.inf, 3.0, 2.0]
    for a, b in zip(sharded["steps"], plain["steps"], strict=True):
        assert a["names"] == b["names"] and len(a["names"]) == 36  # frozen embeddings and layer 0: no norm
        assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in a["names"])
        for key in ("param_norms", "l2_norms"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=1e-5, atol=1e-8, msg=key)
        for key in ("total_norm", "total_norm_post_clip"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["norm_type"], key)
        if a["torch_total_norm"] is not None:  # torch's own DTensor norm agrees with ours
            assert a["total_norm"] == pytest.approx(a["torch_total_norm"], rel=1e-6)
            assert a["total_norm_post_clip"] == pytest.approx(a["torch_total_norm_post_clip"], rel=1e-5)
        assert a["total_norm"] > 0.05
    # Norm clipping bounds every step but the one where value clipping (1e-3 per element) already went below.
    post = [s["total_norm_post_clip"] for s in sharded["steps"]]
    assert [post[0], post[1], post[3]] == pytest.approx([0.05] * 3, rel=1e-5) and post[2] < 0.05
    extras = sharded["extras"]
    assert extras["mixed_plain"] == pytest.approx(12**0.5) and extras["mixed_rest_equal"]
    assert "pending reduction" in extras["partial_refused"]
    assert extras["mixed_mesh"] is False
    # The snapshots the mixin recorded, written by the first process only: the global norms, unsharded names.
    for folder, norm_types in (("grad_snapshots", [1.0, "inf", 3.0, 2.0]), ("grad_snapshots_l2", [2.0] * 4)):
        written = load_grad_snapshots(os.path.join(two + ".snapshots", folder), strict=True)
        expected = load_grad_snapshots(os.path.join(one + ".snapshots", folder), strict=True)
        assert [s["step"] for s in written] == [1, 2, 3, 4] and [s["norm_type"] for s in written] == norm_types
        for a, b, step in zip(written, expected, sharded["steps"], strict=True):
            assert list(a["norms"]) == step["names"]
            assert a["norms"] == pytest.approx(b["norms"], rel=1e-5, abs=1e-8)
            norms = step["param_norms"] if folder == "grad_snapshots" else step["l2_norms"]
            assert list(a["norms"].values()) == pytest.approx(norms, rel=1e-6)
            for key in ("total_norm_pre_clip", "total_norm_post_clip"):
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    for name, value in plain["state"].items():
        torch.testing.assert_close(sharded["state"][name], value, rtol=0, atol=1e-5, msg=name)
        trainable = name in sharded["steps"][0]["names"]
        assert torch.equal(value, plain["initial"][name]) != trainable, name
