"""How an adapter file stores each tensor: precision, sparsity and pruned rows or columns.

Values are ``fp32`` (exact), ``fp16``, or ``int8`` (every >= 2-D weight as int8
with one fp32 scale per output channel, where that pays; 1-D tensors as
fp16); binary weights as one bit each (``sign``), masks as bits. Pruned
weights are stored whichever way is smallest: dense, a bitmask plus the kept
values, or the gaps between kept positions plus the values; whole pruned rows
(filters) or columns are dropped and filled back on reading.
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = ("fp32", "fp16", "int8")


VALUE_BYTES = {"f32": 4, "f16": 2, "i8": 1, "sign": 1 / 8, "bits": 1 / 8}



def choose_codec(tensor: torch.Tensor, sign_only: bool, dtype: str) -> str:
    if tensor.dtype == torch.bool:
        return "bits"
    if sign_only:
        return "sign"
    if dtype == "fp16" or (dtype == "int8" and tensor.dim() < 2):
        return "f16"
    return "i8" if dtype == "int8" else "f32"


def _quantize_rows(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output channel (dim 0)."""
    scale = t.abs().flatten(1).amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).view(-1, *[1] * (t.dim() - 1))
    q = torch.round(t / safe).clamp(-127, 127).to(torch.int8)
    return q.numpy(), scale.numpy().astype(np.float32)


def _values(t: torch.Tensor, codec: str) -> tuple[np.ndarray, np.ndarray | None]:
    t = t.detach().cpu()
    if codec == "sign":
        return (t >= 0).numpy(), None
    if codec == "bits":
        return t.bool().numpy(), None
    if codec == "i8":
        return _quantize_rows(t.float())
    return t.to(torch.float16 if codec == "f16" else torch.float32).numpy(), None


def _gaps(mask: np.ndarray) -> np.ndarray:
    index = np.flatnonzero(mask)
    gaps = np.diff(index, prepend=0) if index.size else index
    kind = np.uint8 if gaps.max(initial=0) < 2**8 else np.uint16 if gaps.max(initial=0) < 2**16 else np.uint32
    return gaps.astype(kind)


class Writer:
    """Collects stored arrays and their encodings."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.entries: dict[str, dict] = {}

    def _store(self, name: str, values: np.ndarray) -> None:
        if values.dtype == bool:
            values = np.packbits(values.reshape(-1), bitorder="little")
        self.arrays[name] = np.ascontiguousarray(values)

    def add(self, name: str, t: torch.Tensor, codec: str, structure: str | None = None, mask: str | None = None,
            fill=None, aux: bool = False) -> None:  # fmt: skip
        if codec == "i8" and not self._int8_pays(t, structure, mask):
            codec = "f16"
        full, scale = _values(t, codec)
        entry = {"enc": "dense", "codec": codec, "shape": list(t.shape)}
        if structure in ("rows", "columns"):
            keep = self._mask_of(mask)
            kept = full[keep] if structure == "rows" else full[:, keep]
            entry.update(enc=structure, mask=mask, fill=fill)
            self._store(name, kept)
        else:
            entry["enc"] = self._sparse_choice(t, codec)
            if entry["enc"] == "dense":
                self._store(name, full)
            else:
                nonzero = (t.detach().cpu() != 0).numpy()
                if entry["enc"] == "bitmask":
                    self.arrays[f"{name}:index"] = np.packbits(nonzero.reshape(-1), bitorder="little")
                else:
                    self.arrays[f"{name}:index"] = _gaps(nonzero)
                self._store(name, full[nonzero])
        if scale is not None:
            self.arrays[f"{name}:scale"] = scale
        if aux:
            entry["aux"] = True
        self.entries[name] = entry

    def listed(self) -> dict[str, dict]:
        """The encodings to record: a dense fp32/fp16 tensor stored at its own shape needs none."""
        return {n: e for n, e in self.entries.items() if not (e["enc"] == "dense" and e["codec"] in ("f32", "f16"))
                or e.get("aux")}  # fmt: skip

    def _mask_of(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        return np.unpackbits(self.arrays[name], count=int(np.prod(entry["shape"])), bitorder="little").astype(bool)

    def _int8_pays(self, t: torch.Tensor, structure: str | None, mask: str | None) -> bool:
        """int8 values (1 byte) plus an fp32 scale per row beat fp16 (2 bytes) only with > 4 values a row."""
        if structure == "rows":
            kept = int(self._mask_of(mask).sum()) * (t[0].numel() if t.dim() else 1)
        elif structure == "columns":
            kept = int(self._mask_of(mask).sum()) * t.shape[0]
        else:
            kept = int(t.count_nonzero())
        return kept > 4 * t.shape[0]

    @staticmethod
    def _sparse_choice(t: torch.Tensor, codec: str) -> str:
        """dense, bitmask or gaps: whichever stores ``t`` in fewest bytes (zeros are pruned weights)."""
        if codec in ("sign", "bits") or t.numel() < 2:
            return "dense"  # a zero binary weight still means +1
        nonzero = (t.detach().cpu() != 0).numpy()
        nnz, numel, b = int(nonzero.sum()), t.numel(), VALUE_BYTES[codec]
        costs = {
            "dense": numel * b,
            "bitmask": (numel + 7) // 8 + nnz * b,
            "gaps": nnz * (_gaps(nonzero).itemsize + b),
        }
        return min(costs, key=lambda k: (costs[k], k != "dense"))


def _decode_one(name: str, entry: dict, arrays: dict[str, np.ndarray], done: dict[str, torch.Tensor]) -> torch.Tensor:
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


def decode_tensors(arrays: dict[str, np.ndarray], entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every stored logical tensor at full shape (fp32, or bool for masks); aux entries dropped."""
    done: dict[str, torch.Tensor] = {
        name: torch.from_numpy(array.copy()).float()
        for name, array in arrays.items()
        if name not in entries and ":" not in name  # dense fp32/fp16
    }
    structured = [n for n, e in entries.items() if e["enc"] in ("rows", "columns")]
    for name in [n for n in entries if n not in structured] + structured:
        done[name] = _decode_one(name, entries[name], arrays, done)
    return {n: t for n, t in done.items() if not entries.get(n, {}).get("aux")}
