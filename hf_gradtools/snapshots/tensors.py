"""Full gradient tensors on disk: `grad_snapshots/step-XXXXXXXX.safetensors`, written atomically, read lazily.

The training thread only copies the chosen gradients to the CPU (`GradTensorSaver.copy`: for CUDA tensors a
non-blocking copy into pinned memory, so it only queues the copy); writing the file (`GradTensorCopy.write`: a
temporary file in the same folder, `fsync`, `os.replace`) can then run on a background thread. Each file holds
one tensor per parameter, under its name, and the metadata `step` and `names` (the parameter order).
`load_grad_tensors` opens a file, or a run's file for one step, as a read-only mapping whose tensors are read from
the file only when asked for.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> saver = GradTensorSaver(model.named_parameters(), patterns=[r"^1\\."])
    >>> saver.names
    ['1.weight', '1.bias']
    >>> path = saver.copy(step=10).write_to_run("out")
    >>> grads = load_grad_tensors("out", step=10)
    >>> torch.equal(grads["1.weight"], model[1].weight.grad)
    True
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import write_file_atomic
from ..distributed import is_sharded
from ..errors import DamagedTensorFileError
from ..patterns import example_names, match_names
from ..run_folder import SNAPSHOT_DIR, inside_run_folder, locate_snapshots

TENSOR_SUFFIX = ".safetensors"
_STEP_FILE = re.compile(r"step-(\d+)" + re.escape(TENSOR_SUFFIX) + "$")


def grad_tensor_path(output_dir: str | os.PathLike, step: int, folder: str = SNAPSHOT_DIR) -> str:
    """`<output_dir>/<folder>/step-XXXXXXXX.safetensors`, beside the step's JSON snapshot.

    `folder` is the snapshot callback's folder (`GradSnapshotCallback.folder`), `grad_snapshots` by default.
    """
    return os.path.join(os.fspath(output_dir), folder, f"step-{step:08d}{TENSOR_SUFFIX}")


@dataclass
class GradTensorCopy:
    """CPU copies of the gradients of one step, ready to be written by any thread.

    Attributes:
        step: the optimizer step (the `global_step` it produces).
        tensors: `{parameter name: CPU tensor}`, in parameter order.
    """

    step: int
    tensors: dict[str, torch.Tensor]
    _pending: list = field(default_factory=list, repr=False)  # CUDA events of copies still in flight

    def wait(self) -> None:
        """Block until every device-to-host copy has landed (only CUDA copies are asynchronous)."""
        for event in self._pending:
            event.synchronize()
        self._pending = []

    def write(self, path: str | os.PathLike, inside: str | os.PathLike | None = None) -> str:
        """Write the tensors to the safetensors file `path` atomically; return the path.

        On any error no temporary file is left and an existing `path` is kept as it was. `inside`: the run folder,
        which the folder of `path` must not leave through a link (`atomic.write_file_atomic`).
        """
        self.wait()
        metadata = {"step": str(self.step), "names": json.dumps(list(self.tensors))}
        write_file_atomic(path, lambda tmp: save_file(self.tensors, tmp, metadata=metadata), inside=inside)
        return os.fspath(path)

    def write_to_run(self, output_dir: str | os.PathLike, folder: str = SNAPSHOT_DIR) -> str:
        """`write(grad_tensor_path(output_dir, step, folder))`, refusing a snapshot folder linked out of the run."""
        return self.write(grad_tensor_path(output_dir, self.step, folder), inside=output_dir)


class GradTensorSaver:
    """Selects the parameters whose gradients are saved, once, and copies their gradients at each snapshot.

    Args:
        named_parameters: `(name, parameter)` pairs to choose from, e.g. the trainable ones of the model.
        patterns: regex name patterns (`re.search`); each must match at least one name (`grad_snapshot_tensors`).

    Raises:
        ValueError: a pattern is not a regex, or matches no name; the message names `grad_snapshot_tensors`, the
            pattern and a few parameter names.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], patterns: Iterable[str]):
        named = list(named_parameters)
        chosen = set(match_names([name for name, _ in named], patterns, field="grad_snapshot_tensors"))
        self._params = [(name, param) for name, param in named if name in chosen]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._params]

    def copy(self, step: int) -> GradTensorCopy:
        """Copy the current `.grad` of the chosen parameters to the CPU (those without a gradient are left out).

        Call it before clipping to save the accumulated gradient as the backward passes left it. For CUDA
        gradients the copies go into pinned memory without blocking; `GradTensorCopy.write` waits for them.
        FSDP2 (DTensor) gradients are gathered whole first: call it on every process.
        """
        tensors, pending = {}, []
        for name, param in self._params:
            grad = param.grad
            if grad is None:
                continue
            grad = grad.detach()
            if is_sharded([grad]):
                # FSDP2: gather the whole gradient (a collective: every process copies the same parameters in the
                # same order, and the trainer calls this on every process); only the main process writes it.
                grad = grad.full_tensor()
            if grad.is_cuda:
                host = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
                host.copy_(grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(grad.device))
                pending.append(event)
            else:
                host = grad.to("cpu", copy=True)
            tensors[name] = host.contiguous()
        return GradTensorCopy(step=step, tensors=tensors, _pending=pending)


class GradTensors(Mapping):
    """The gradients saved in one safetensors file, read from the file when a name is looked up.

    A read-only `Mapping[str, torch.Tensor]` (CPU tensors), in parameter order. `step` is the optimizer step.

    Raises:
        FileNotFoundError: no file at `path`.
        DamagedTensorFileError: the file is truncated, not safetensors, or its metadata is not `write`'s; the
            message names the file (also when a lookup reads a damaged tensor).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No gradient tensor file at {self.path!r}.")
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
                metadata = f.metadata() or {}
            order = json.loads(metadata["names"]) if "names" in metadata else []
            self.step = int(metadata["step"]) if "step" in metadata else None
        except (SafetensorError, ValueError) as e:  # includes bad `names` JSON and a `step` that is no integer
            raise self._damaged(e) from None
        readable = isinstance(order, list) and all(isinstance(name, str) for name in order)
        self._names = order if readable and sorted(order) == sorted(keys) else keys

    def _damaged(self, error: Exception) -> DamagedTensorFileError:
        return DamagedTensorFileError(f"{self.path!r} is not a readable gradient tensor file: {error}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(f"{name!r} is not in {self.path!r}; it holds {example_names(self._names)}.")
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise self._damaged(e) from None

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"GradTensors(step={self.step}, path={self.path!r}, names={example_names(self._names)})"


def grad_tensor_files(path: str | os.PathLike) -> dict[int, str]:
    """`{step: file}` of every gradient tensor file of a run (its `output_dir` or `grad_snapshots` folder).

    Raises:
        OutsideRunFolderError: the snapshot folder is a link out of the run folder (`run_folder.py`).
    """
    folder = locate_snapshots(path)[1]
    files = {}
    for file in glob.glob(os.path.join(glob.escape(folder), f"step-*{TENSOR_SUFFIX}")):
        match = _STEP_FILE.search(os.path.basename(file))
        if match:
            files[int(match.group(1))] = file
    return dict(sorted(files.items()))


def load_grad_tensors(path: str | os.PathLike, step: int | None = None) -> GradTensors:
    """Open saved gradients lazily: a `.safetensors` file, or with `step` the file of that step in a run folder.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> path = GradTensorSaver(model.named_parameters(), patterns=["weight"]).copy(step=10).write_to_run("out")
        >>> grads = load_grad_tensors("out", step=10)
        >>> grads["weight"].shape  # read from disk now
        torch.Size([2, 3])

    Raises:
        FileNotFoundError: no such file, or no file for `step` (the message lists the steps there are).
        OutsideRunFolderError: the file of `step`, or the snapshot folder, leads out of the run folder.
        DamagedTensorFileError: the file is not a readable tensor file.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return GradTensors(path)
    if step is None:
        raise FileNotFoundError(f"{path!r} is not a gradient tensor file; for a run folder, give the `step` to load.")
    run = locate_snapshots(path)[0]
    files = grad_tensor_files(path)
    if step not in files:
        steps = ", ".join(str(s) for s in files) or "none"
        raise FileNotFoundError(
            f"No gradient tensors of step {step} in {path!r} (steps with tensors: {steps}); they are saved with "
            "the snapshots of parameters chosen by `grad_snapshot_tensors`."
        )
    return GradTensors(inside_run_folder(run, files[step]))
