"""Is a checkpoint's weights or torch file whole? Read from its own structure, without loading it.

A `*.safetensors` file is whole when its JSON header parses and the tensors it describes end where the file ends; a
torch file (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `*.bin` in torch's zip format) when its zip directory,
written last, is there and its entries lie inside the file. A file cut off (a copy that stopped, a full disk outside
the Trainer's atomic saves) fails that test; torch and safetensors would otherwise fail on it later with errors that
name no file (`PytorchStreamReader failed reading zip archive`, `incomplete metadata, file not fully covered`).
Only the header and the zip directory are read.

Example:
    >>> import torch
    >>> torch.save({"step": 3}, "optimizer.pt")
    >>> file_damage("optimizer.pt") is None
    True
    >>> with open("optimizer.pt", "r+b") as f:
    ...     _ = f.truncate(100)
    >>> file_damage("optimizer.pt")
    'cut off or not a torch file: 100 bytes, with no zip directory at the end'
"""

from __future__ import annotations

import json
import os
import zipfile

_TORCH_ENDINGS = (".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size
_NOT_RESUMED = {"training_args.bin"}  # a record of the run's arguments; a resume does not load it


def file_damage(path: str | os.PathLike) -> str | None:
    """Why the weights or torch file at `path` is not whole, or `None` when it is (or is of another kind).

    A torch file in the legacy (non-zip) format is not checked; an empty one is damaged.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if path.endswith(".safetensors"):
        return _safetensors_damage(path, size)
    if path.endswith(_TORCH_ENDINGS):
        return _torch_damage(path, size)
    return None


def damaged_file(folder: str | os.PathLike) -> tuple[str, str] | None:
    """The first damaged weights or torch file directly in `folder`, as `(path, why)`, or `None`.

    Symbolic links, `folder` itself included, are passed over (a resume refuses those that leave the run folder
    before reading them), and so is `training_args.bin`, which a resume does not load.
    """
    if os.path.islink(folder):
        return None
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False) and entry.name not in _NOT_RESUMED:
                why = file_damage(entry.path)
                if why is not None:
                    return entry.path, why
    return None


def _safetensors_damage(path: str, size: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"cut off: {size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER):
            return f"cut off: {size} bytes, and its header alone says {length} bytes"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            return "its safetensors header is not JSON"
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"its safetensors header has no valid `data_offsets` for {name!r}"
        end = max(end, offsets[1])
    if 8 + length + end != size:
        return f"cut off: {size} bytes, where its header describes {8 + length + end}"
    return None


def _torch_damage(path: str, size: int) -> str | None:
    if size == 0:
        return "empty (0 bytes)"
    with open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4:
            return f"cut off: {size} bytes, shorter than any torch file"
        if magic != _ZIP_MAGIC:
            return None  # torch's legacy format (or a pickle): not checked here
        try:
            with zipfile.ZipFile(f) as archive:
                members = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return f"cut off or not a torch file: {size} bytes, with no zip directory at the end"
    for member in members:
        if member.header_offset + member.compress_size > size:
            return f"cut off: {member.filename!r} lies past the end of the file ({size} bytes)"
    return None
