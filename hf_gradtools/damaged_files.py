"""Is each file a resume loads from a checkpoint whole? Read from the file's own structure, without loading it.

The files a resume loads: the weights (`*.safetensors`, `pytorch_model*.bin` and `adapter_model*.bin`, the index of
sharded weights and every shard it names), `config.json`, and `optimizer`, `scheduler` and `scaler` `.pt`,
`rng_state*.pth`. Each is whole when:
- `*.safetensors`: its JSON header parses and the tensors it describes end where the file ends;
- a torch file in torch's zip format: its zip directory (written last) is there and its entries lie inside the file;
  a file in neither the zip nor torch's legacy format is not a torch file (a legacy file is not judged further);
- `*.index.json` and `config.json`: a JSON object; every shard an index names is in the folder.
A file cut off (a copy that stopped, a full disk outside the Trainer's saves) or overwritten fails its test; torch
and safetensors would otherwise fail later with errors that name no file (`PytorchStreamReader failed reading zip
archive`, `incomplete metadata, file not fully covered`, `Weights only load failed`). Only headers and the zip
directory are read, so bytes changed inside a file of the right size and layout are not found.

Example:
    >>> import torch
    >>> torch.save({"step": 3}, "optimizer.pt")
    >>> file_damage("optimizer.pt") is None
    True
    >>> with open("optimizer.pt", "r+b") as f:
    ...     _ = f.truncate(100)
    >>> file_damage("optimizer.pt")
    'cut off: 100 bytes, with no zip directory at the end'
"""

from __future__ import annotations

import json
import os
import re
import zipfile

from .run_folder import is_within

_ZIP_MAGIC = b"PK\x03\x04"
# What `torch.save(..., _use_new_zipfile_serialization=False)` writes first: pickle protocol 2, then torch's magic
# number 0x1950A86A20F9469CFC6C as a 10-byte LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size
# The torch files a resume loads, by the names transformers and accelerate give them (FSDP: `_fsdp`, `_<rank>`);
# shards named by a `*.index.json` are weights whatever their names. Other `.bin` files (a callback's own) are not.
_TORCH_FILE = re.compile(
    r"^(optimizer|scheduler|scaler)(_\d+)?\.(pt|bin)$|^rng_state(_\d+)?\.pth$"
    r"|^(pytorch_model|adapter_model)(_fsdp)?(_\d+)?(-\d+-of-\d+)?\.bin$"
)
_JSON_FILE = re.compile(r"^config\.json$|\.index\.json$")


def file_damage(path: str | os.PathLike, shard: bool = False) -> str | None:
    """Why the file at `path` is not whole, or `None` when it is, or is not a file a resume loads (by its name, or
    `shard`: an index names it)."""
    path = os.fspath(path)
    name, size = os.path.basename(path), os.path.getsize(path)
    if name.endswith(".safetensors"):
        return _safetensors_damage(path, size)
    if _TORCH_FILE.search(name) or shard:
        return _torch_damage(path, size)
    if _JSON_FILE.search(name):
        return _json_damage(path)
    return None


def damaged_files(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """The damaged files that a resume loads, directly in `folder`, as `(path, why)` by name; `[]` when none is.

    A symbolic link (`folder` itself too) is followed where it stays in the run folder, `folder`'s parent; one that
    leads out is passed over, and a resume refuses it before reading anything.
    """
    run_folder = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    if not is_within(os.path.realpath(folder), run_folder):
        return []
    found = []
    with os.scandir(folder) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    shards = {name for entry in entries if entry.name.endswith(".index.json") for name in _shards(entry.path)}
    for entry in entries:
        try:
            inside = is_within(os.path.realpath(entry.path), run_folder)
            regular, folder_entry = entry.is_file(), entry.is_dir()
        except OSError as error:  # a link loop
            found.append((entry.path, f"unreadable ({type(error).__name__}: {error.strerror})"))
            continue
        if not inside:
            continue
        if not regular and not folder_entry and _loaded(entry.name, shards) and os.path.exists(entry.path):
            found.append((entry.path, "not a regular file (a pipe or device)"))  # reading it would block
        if regular:
            why = file_damage(entry.path, shard=entry.name in shards)
            if why is None and entry.name.endswith(".index.json"):
                why = _missing_shard(entry.path)
            if why is not None:
                found.append((entry.path, why))
    return found


def _loaded(name: str, shards: set[str]) -> bool:
    """Whether a resume loads a file of this name."""
    return bool(name.endswith(".safetensors") or _TORCH_FILE.search(name) or _JSON_FILE.search(name) or name in shards)


def _safetensors_damage(path: str, size: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"cut off: {size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > _MAX_HEADER:
            return f"not a safetensors file: its first 8 bytes give a header of {length} bytes"
        if length > size - 8:
            return f"cut off: {size} bytes, and its header alone says {length} bytes"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            return "its safetensors header is not JSON"
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    if not any(name != "__metadata__" for name in header):
        return "it holds no tensors (the resumed model would keep its fresh weights)"
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
        magic = f.read(len(_LEGACY_MAGIC))
        if magic.startswith(_LEGACY_MAGIC):
            return None  # torch's legacy format: not judged here
        if not magic.startswith(_ZIP_MAGIC):
            if _ZIP_MAGIC.startswith(magic) or _LEGACY_MAGIC.startswith(magic):
                return f"cut off: {size} bytes, shorter than any torch file"
            return "not a torch file: it starts as neither torch's zip nor its legacy format"
        try:
            with zipfile.ZipFile(f) as archive:
                members = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return f"cut off: {size} bytes, with no zip directory at the end"
    for member in members:
        if member.header_offset + member.compress_size > size:
            return f"cut off: {member.filename!r} lies past the end of the file ({size} bytes)"
    return None


def _json_damage(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        return f"not JSON ({type(e).__name__}: {e}; cut off or overwritten)"
    return None if isinstance(data, dict) else "not a JSON object"


def _shards(index_path: str) -> set[str]:
    """The file names a readable, in-run-folder index's `weight_map` names (none for a damaged index)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return set()
    return {v for v in weight_map.values() if isinstance(v, str)} if isinstance(weight_map, dict) else set()


def _missing_shard(index_path: str) -> str | None:
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return "its `weight_map` is not an object of file names"
    folder = os.path.dirname(index_path)
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(folder, shard)):
            return f"it names the shard {shard!r}, which is not in the folder"
    return None
