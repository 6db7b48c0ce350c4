"""Atomic file writes: a reader or a crash sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any

from .run_folder import inside_run_folder


def write_file_atomic(
    path: str | os.PathLike, write: Callable[[str], None], *, inside: str | os.PathLike | None = None
) -> None:
    """Have `write(tmp)` create a temporary file in the folder of `path`, then `fsync` it and `os.replace` it.

    When anything fails (in `write` too: a full disk, a folder that cannot be written), the temporary file is
    removed, `path` is left as it was, and the error is raised again; an `OSError` that named no file is raised
    again naming `path`. A symbolic link at `path` is replaced, never written through.

    Args:
        inside: the run folder `path` belongs to: a folder of `path` that leads out of it through a link is refused
            (`run_folder.OutsideRunFolderError`), before anything is created.

    Example:
        >>> import torch
        >>> from safetensors.torch import load_file, save_file
        >>> tensors = {"classifier.weight": torch.ones(2, 3)}
        >>> write_file_atomic("out/grads.safetensors", lambda tmp: save_file(tensors, tmp))
        >>> load_file("out/grads.safetensors")["classifier.weight"].shape
        torch.Size([2, 3])
    """
    path = os.fspath(path)
    if inside is not None:
        inside_run_folder(inside, path, replaced=True)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        try:
            os.unlink(tmp)  # this name is this thread's own: whatever is there (a planted link) is not written through
        except FileNotFoundError:
            pass
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # `write` and `fsync` errors name no file: "[Errno 28] No space left on device" alone says not where.
            raise OSError(e.errno, e.strerror, path) from e  # the errno picks the same subclass (PermissionError...)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, inside: str | os.PathLike | None = None) -> None:
    """Write `text` to `path` through a temporary file in the same folder, `fsync` and `os.replace`.

    The file gets the usual permissions (0666 less the umask), as `open` would give it. When the write fails (a
    full disk, a folder that cannot be written), the temporary file is removed and the `OSError` is raised again,
    naming `path` when it named no file. `inside`: as in `write_file_atomic`.

    Example:
        >>> from pathlib import Path
        >>> write_text_atomic("out/predict_results_sst2.txt", "index\\tprediction\\n")
        >>> Path("out/predict_results_sst2.txt").read_text()
        'index\\tprediction\\n'
    """

    def write(tmp: str) -> None:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)

    write_file_atomic(path, write, inside=inside)


def write_json_atomic(path: str | os.PathLike, data: Any, *, inside: str | os.PathLike | None = None) -> None:
    """Write `data` as indented JSON to `path` atomically (see `write_text_atomic`; `inside` as there).

    Example:
        >>> import json
        >>> write_json_atomic("out/frozen_parameters.json", {"frozen": []})
        >>> with open("out/frozen_parameters.json") as f:
        ...     json.load(f)
        {'frozen': []}
    """
    write_text_atomic(path, json.dumps(data, indent=1), inside=inside)
