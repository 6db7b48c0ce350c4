"""The non-finite gradient guard: exact NaN/Inf detection, skip counting, the stop message, DDP agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_gradtools.clipping import grad_norms
from hf_gradtools.distributed import agree_across_ranks
from hf_gradtools.errors import GradToolsError
from hf_gradtools.guards import (
    NonFiniteGradientError,
    NonFiniteGuard,
    has_nonfinite,
    nonfinite_names,
    norms_nonfinite,
    skip_message,
)

NAMES = ["a.weight", "a.bias", "b.weight", "c.weight"]


def grads_with(bad: dict[int, float]) -> list[torch.Tensor]:
    grads = [torch.ones(3, 2), torch.zeros(2), torch.full((4,), 0.5), torch.ones(1, dtype=torch.float16)]
    for i, value in bad.items():
        grads[i].view(-1)[-1] = value
    return grads


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_detects_each_kind_of_non_finite_value(value):
    assert not bool(has_nonfinite(grads_with({})))
    for i in range(4):
        grads = grads_with({i: value})
        flag = has_nonfinite(grads)
        assert flag.dtype == torch.bool and flag.ndim == 0 and bool(flag), i
        assert nonfinite_names(NAMES, grads) == [NAMES[i]]
        for norm_type in (1.0, 2.0, math.inf):
            assert bool(norms_nonfinite(grad_norms(grads, norm_type))), (i, norm_type)
    assert not bool(norms_nonfinite(grad_norms(grads_with({}), 2.0)))


def test_large_finite_gradients_are_not_flagged():
    # Their L2 norm overflows float32 (1e30 squared), and fp16's 60000 squared overflows float16: still finite.
    grads = [torch.full((4,), 1e30), torch.full((3,), 60000.0, dtype=torch.float16)]
    assert torch.isinf(torch.linalg.vector_norm(grads[0]))
    assert not bool(has_nonfinite(grads))
    assert not bool(has_nonfinite([])) and not bool(has_nonfinite([torch.zeros(0), torch.ones(2)]))
    # The free check from L2 norms fires on the overflow, as documented.
    assert bool(norms_nonfinite(grad_norms(grads[:1], 2.0)))


def test_nonfinite_names_in_order_and_limited():
    grads = grads_with({0: math.nan, 2: math.inf, 3: -math.inf})
    assert nonfinite_names(NAMES, grads) == ["a.weight", "b.weight", "c.weight"]
    assert nonfinite_names(NAMES, grads, limit=2) == ["a.weight", "b.weight"]
    with pytest.raises(ValueError, match="`names` has 3 entries but `grads` has 4"):
        nonfinite_names(NAMES[:3], grads)


def test_guard_counts_skips_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3)
    for step, skipped in [(1, True), (2, True), (3, False), (4, True), (5, True)]:
        guard.record(skipped, step, ["a.weight"] if skipped else [])
    assert (guard.nonfinite_skips, guard.consecutive) == (4, 2)
    with pytest.raises(NonFiniteGradientError) as error:
        guard.record(True, 6, ["a.weight", "b.bias"])
    assert isinstance(error.value, GradToolsError) and isinstance(error.value, ValueError)
    assert str(error.value).startswith(
        "Non-finite gradients at 3 consecutive optimizer steps (4 to 6), the limit set by `max_nonfinite_skips`=3; "
        "training stopped at step 6. Parameters with NaN/Inf gradients at step 6: a.weight, b.bias."
    )
    assert guard.nonfinite_skips == 5


def test_guard_limit_of_one_stops_at_the_first_skip():
    guard = NonFiniteGuard(max_consecutive=1)
    guard.record(False, 1)
    with pytest.raises(NonFiniteGradientError, match=r"at 1 consecutive optimizer steps \(2 to 2\)"):
        guard.record(True, 2)


def test_guard_state_round_trip_continues_the_count():
    guard = NonFiniteGuard(max_consecutive=3)
    for step in (7, 8, 9, 10):
        guard.record(step != 8, step)
    state = guard.state_dict()
    assert state == {"nonfinite_skips": 3, "consecutive": 2, "first_skipped_step": 9}
    resumed = NonFiniteGuard(max_consecutive=3)
    resumed.load_state_dict(state)
    with pytest.raises(NonFiniteGradientError, match=r"\(9 to 11\)"):
        resumed.record(True, 11)
    with pytest.raises(ValueError, match="NonFiniteGuard state must be"):
        resumed.load_state_dict({"consecutive": 1})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3", None])
def test_guard_bad_limit_names_the_field(bad):
    with pytest.raises(ValueError, match=f"`max_nonfinite_skips` must be a positive integer, got {bad!r}"):
        NonFiniteGuard(bad)


def test_skip_message():
    assert skip_message(4, ["a.weight", "b.bias"], 2) == (
        "Skipped optimizer step 4: non-finite (NaN/Inf) gradients in a.weight, b.bias (2 skipped so far)."
    )


def test_agreement_without_a_process_group_is_the_flag_itself():
    flag = torch.tensor(True)
    assert not dist.is_initialized() and agree_across_ranks(flag) is flag


def _rank_decides(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Only rank 1 sees a NaN; every rank must decide to skip.
        grads = [torch.ones(3), torch.tensor([math.nan if rank == 1 else 1.0])]
        decision = agree_across_ranks(has_nonfinite(grads))
        clean = agree_across_ranks(has_nonfinite([torch.ones(3)]))
        torch.save({"skip": bool(decision), "clean": bool(clean), "dtype": str(decision.dtype)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in mp.get_all_start_methods(), reason="needs torch.distributed and fork"
)
def test_two_processes_agree_to_skip(tmp_path):
    out = str(tmp_path / "decision")
    # Forked (not spawned) workers start in milliseconds: they inherit the imported modules.
    mp.start_processes(_rank_decides, args=(str(tmp_path / "init"), out), nprocs=2, start_method="fork")
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert results == [{"skip": True, "clean": False, "dtype": "torch.bool"}] * 2
