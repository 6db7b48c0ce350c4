"""Atomic file writes: a reader or a crash sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, `fsync` and `os.replace`.

    The file gets the usual permissions (0666 less the umask), as `open` would give it. When the write fails (a
    full disk, a folder that cannot be written), the temporary file is removed and the `OSError` is raised again,
    naming `path` when it named no file.

    Example:
        >>> write_text_atomic("out/predict_results_sst2.txt", "index\\tprediction\\n")  # doctest: +SKIP
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # `write` and `fsync` errors name no file: "[Errno 28] No space left on device" alone says not where.
            raise OSError(e.errno, e.strerror, path) from e  # the errno picks the same subclass (PermissionError...)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically (see `write_text_atomic`).

    Example:
        >>> write_json_atomic("out/frozen_parameters.json", {"frozen": []})  # doctest: +SKIP
    """
    write_text_atomic(path, json.dumps(data, indent=1))
