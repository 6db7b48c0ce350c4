"""A hand-written loop over a partly frozen tiny BERT, sharded by FSDP2 (`fully_shard`) under torchrun, or alone.

Each optimizer step accumulates 2 micro-batches and clips in a different norm (1, inf, 3, 2; value clipping too at
the third step) through `GradTrainerMixin._clip_and_record`, the trainer's own clipping and snapshot step (run on
a stand-in for the Trainer, whose FSDP path falls back to DDP on CPU): it calls `hf_gradtools.clip_gradients` and
hands the norms to two `GradSnapshotCallback`s, one in the clipping norm and one (`l2`) always in L2, which write
snapshots to OUT_FILE.snapshots/ from the first process. Alone (no torchrun), it plays both processes at once: each
micro-batch is the two processes' micro-batches together, so the gradients are the same as the sharded run's.
Writes, from the first process, the norms of every step and the final weights (unsharded) to OUT_FILE.

Usage: python fsdp2_clip.py OUT_FILE
"""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers as T  # noqa: E402
from transformers import TrainerState  # noqa: E402
from transformers.trainer_optimizer import has_mixed_dtensor  # noqa: E402

from hf_gradtools import freeze_embeddings, freeze_first_n_layers  # noqa: E402
from hf_gradtools.clipping import grad_norms  # noqa: E402
from hf_gradtools.clipping.component import GradientClipping  # noqa: E402
from hf_gradtools.components import ParameterNames  # noqa: E402
from hf_gradtools.guards import StepSkipper  # noqa: E402
from hf_gradtools.settings import GradSettings  # noqa: E402
from hf_gradtools.snapshots import GradSnapshotCallback  # noqa: E402
from hf_gradtools.snapshots.feed import SnapshotFeed  # noqa: E402
from hf_gradtools.trainer import GradTrainerMixin  # noqa: E402
from tests.conftest import exit_without_teardown, tiny_config, token_rows  # noqa: E402

WORLD = 2  # processes of the sharded run, also when the reference plays them alone
BATCH = 2  # rows per process and micro-batch
ACCUMULATION = 2
NORM_TYPES = [1.0, math.inf, 3.0, 2.0]
MAX_NORM = 0.05  # small enough that every step clips


def build_model() -> T.PreTrainedModel:
    torch.manual_seed(0)
    config = tiny_config("bert")
    # One output: the classifier's weight (1 x 16) and bias (1) leave the second process an empty shard.
    config.num_labels = 1
    model = T.AutoModelForSequenceClassification.from_config(config)
    freeze_embeddings(model)
    freeze_first_n_layers(model, 1)
    return model


def rows(step: int, micro: int, rank: int, world: int) -> slice:
    """The rows of one micro-batch of one process (the reference takes every process's rows at once)."""
    start = ((step * ACCUMULATION + micro) * WORLD + rank * (WORLD // world)) * BATCH
    return slice(start, start + BATCH * WORLD // world)


def torch_total_norm(grads: list[torch.Tensor], norm_type: float) -> float | None:
    """torch's own DTensor-aware total norm, as a cross-check; None for inf, where torch 2.13 raises on the
    second process ("_foreach_norm cannot compute the infinity norm on an empty tensor") for its empty shard."""
    if math.isinf(norm_type):
        return None
    value = torch.nn.utils.get_total_norm(grads, norm_type)
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).item()


def mixed_and_partial_checks(grads: list[torch.Tensor], l2: torch.Tensor, world: int) -> dict:
    """A plain tensor among DTensors keeps its own norm; a gradient with a pending sum is refused on every process."""
    plain = torch.full((3,), 2.0)
    mixed = grad_norms([*grads, plain], 2.0)
    checks = {"mixed_plain": mixed[-1].item(), "mixed_rest_equal": torch.equal(mixed[:-1], l2)}
    if world > 1:
        from torch.distributed.tensor import DTensor, Partial

        pending = DTensor.from_local(torch.ones(4), grads[0].device_mesh, [Partial()])
        try:
            grad_norms([grads[0], pending], 2.0)
            checks["partial_refused"] = ""
        except ValueError as e:
            checks["partial_refused"] = str(e)
    return checks


class KeepingCallback(GradSnapshotCallback):
    """A snapshot callback that also keeps what the trainer handed it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fed_by_trainer = True
        self.results = []

    def record(self, args, state, names, result):
        self.results.append(result)
        super().record(args, state, names, result)


class TrainerStandIn:
    """What `GradTrainerMixin._clip_and_record` reads of the Trainer: accelerator, args (and `grad_settings`), model,
    state, callbacks, and the run's components (clipping by `clip_algorithm`, here `norm`, and the snapshot feed)."""

    def __init__(self, model, output_dir: str, rank: int):
        self.model = model
        self.accelerator = SimpleNamespace(unscale_gradients=lambda: None)  # no grad scaler in fp32
        self.args = SimpleNamespace(output_dir=output_dir, max_grad_norm=MAX_NORM, grad_snapshot_steps=1)
        self.state = TrainerState()
        self.state.is_world_process_zero = rank == 0
        self.callbacks = [KeepingCallback(), KeepingCallback(norm_type=2.0, name="l2")]
        self.optimizer = None
        self._names = ParameterNames()
        self._skipper = StepSkipper()
        self._device_skips, self.device_read_every = [], 100  # no guard decides on the device here

    @property
    def grad_settings(self):
        # GradTrainer resolves them at each `train()`; this driver changes `args` between steps.
        return GradSettings.from_args(self.args)

    def _snapshot_callbacks(self):
        return self.callbacks

    @property
    def components(self):
        return [GradientClipping(self.grad_settings), SnapshotFeed(self.grad_settings)]

    def component(self, cls):
        return next((c for c in self.components if isinstance(c, cls)), None)


def main(out_file: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    rank = dist.get_rank() if world > 1 else 0
    trainer = TrainerStandIn(model, out_file + ".snapshots", rank)
    total_rows = len(NORM_TYPES) * ACCUMULATION * WORLD * BATCH
    ids = torch.tensor(token_rows(total_rows, seed=3))
    targets = torch.linspace(-2.0, 2.0, total_rows)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    record = []
    for step, norm_type in enumerate(NORM_TYPES):
        for micro in range(ACCUMULATION):
            batch = rows(step, micro, rank, world)
            loss = model(input_ids=ids[batch], labels=targets[batch]).loss / ACCUMULATION
            loss.backward()
        params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        grads = [p.grad for _, p in params]
        reference = torch_total_norm(grads, norm_type)
        l2 = grad_norms(grads, 2.0)  # another norm of the same gradients: a second reduction per step
        if step == 0:
            extras = mixed_and_partial_checks(grads, l2, world)
            extras["mixed_mesh"] = has_mixed_dtensor(grads)  # False: the mixin clips itself, not the Trainer
        trainer.args.clip_norm_type, trainer.args.clip_grad_value = norm_type, 1e-3 if step == 2 else None
        trainer.state.global_step = step
        total = GradTrainerMixin._clip_and_record(trainer)
        result = trainer.callbacks[0].results[-1]  # the clipping's own result, as the snapshot got it
        assert total is result.total_norm
        after = torch_total_norm(grads, norm_type)
        record.append(
            {
                "norm_type": norm_type,
                "names": [n for n, _ in params],
                "param_norms": result.param_norms.tolist(),
                "l2_norms": l2.tolist(),
                "total_norm": result.total_norm.item(),
                "torch_total_norm": reference,
                "total_norm_post_clip": result.total_norm_post_clip.item(),
                "torch_total_norm_post_clip": after,
            }
        )
        optimizer.step()
        optimizer.zero_grad()
    state = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name] = full.detach().clone()
    for callback in trainer.callbacks:
        callback.close()  # the snapshots are written
    if rank == 0:
        torch.save({"steps": record, "state": state, "initial": initial, "extras": extras}, out_file)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
