"""Adapter files of format 1 (before BatchNorm folding and bit widths): one array per tensor, encodings by name.

Training runs of earlier versions wrote them; they still load (onto a base
whose norms are not folded, when they change base tensors), and ``task=export``
turns them into format 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_adapt.adapters.file_layout import load_part
from bnn_adapt.bases.fingerprint import norms_folded
from bnn_adapt.errors import ExportError

PARTS = ("adapter", "head", "base")  # tensor name prefixes in a format-1 file



def decode_v1(arrays: dict[str, np.ndarray], entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every logical tensor of a version-1 file (one array per tensor, encodings by name), at full shape."""
    done: dict[str, torch.Tensor] = {
        name: torch.from_numpy(array.copy()).float()
        for name, array in arrays.items()
        if name not in entries and ":" not in name  # dense fp32/fp16
    }
    structured = [n for n, e in entries.items() if e["enc"] in ("rows", "columns")]
    for name in [n for n in entries if n not in structured] + structured:
        done[name] = _decode_v1_one(name, entries[name], arrays, done)
    return {n: t for n, t in done.items() if not entries.get(n, {}).get("aux")}


def _decode_v1_one(name: str, entry: dict, arrays: dict[str, np.ndarray], done: dict[str, torch.Tensor]) -> torch.Tensor:
    shape, codec, enc = entry["shape"], entry["codec"], entry["enc"]
    stored = arrays[name]
    full = np.zeros(shape, dtype=bool if codec in ("sign", "bits") else stored.dtype)
    mask = None
    if enc in ("rows", "columns"):
        mask = done[entry["mask"]].numpy()
        row = int(np.prod(shape[1:])) if enc == "rows" else shape[0]
        count = int(mask.sum()) * row
    elif enc == "dense":
        count = full.size
    else:
        index = arrays[f"{name}:index"]
        if enc == "bitmask":
            index = np.flatnonzero(np.unpackbits(index, count=full.size, bitorder="little"))
        else:
            index = np.cumsum(index.astype(np.int64))
        count = index.size
    values = np.unpackbits(stored, count=count, bitorder="little").astype(bool) if full.dtype == bool else stored
    if enc == "dense":
        full = values.reshape(shape)
    elif enc == "rows":
        full[mask] = values.reshape(-1, *shape[1:])
    elif enc == "columns":
        full[:, mask] = values.reshape(shape[0], -1)
    else:
        full.reshape(-1)[index] = values
    t = torch.from_numpy(np.array(full))
    if codec == "sign":
        t = torch.where(t, 1.0, -1.0)
    elif codec == "i8":
        t = t.float() * torch.from_numpy(arrays[f"{name}:scale"].copy()).view(-1, *[1] * (len(shape) - 1))
    elif codec != "bits":
        t = t.float()
    if mask is not None:
        fill = entry["fill"]
        gone = ~torch.from_numpy(mask)
        index = (gone,) if enc == "rows" else (slice(None), gone)
        t[index] = done[fill].to(t.dtype) if isinstance(fill, str) else fill
    return t


def attach_v1(model: nn.Module, arrays: dict, meta: dict, path: Path) -> dict[str, torch.Tensor]:
    """Load a version-1 file (BN unfolded) into ``model``; returns its base tensors."""
    tensors = decode_v1(arrays, meta["tensors"])
    parts = {p: {k[len(p) + 1 :]: t for k, t in tensors.items() if k.startswith(p + ".")} for p in PARTS}
    if norms_folded(model.base) and (parts["base"] or model.strategy == "bitfit"):
        raise ExportError(
            f"{path} was written before BatchNorms were folded and cannot change this packed base's norms; "
            f"export it again: python -m bnn_adapt task=export export.adapter_run=[RUN_DIR]"
        )
    if model.adapter is not None:
        load_part(model.adapter, parts["adapter"], "adapter")
    load_part(model.head, parts["head"], "head")
    return parts["base"]
