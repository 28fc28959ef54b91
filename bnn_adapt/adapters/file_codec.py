"""How an adapter file stores each tensor: precision, bit-packing, sparsity and pruned rows or columns.

Every tensor is one *record* written into a few shared streams (the file's
only arrays: ``f32``, ``f16``, ``i8`` and ``u8``; a separate array and header
entry per tensor cost more than the smallest adapters' values). A record's
*codec* says how its values are stored:

* ``f32`` (exact) or ``f16`` values;
* ``q1`` ... ``q16``: a weight trained at that many bits (``adapter.bits``): its
  integer codes bit-packed at that width (offset binary; at 1 bit the sign,
  zeros being pruned weights and stored as such), then one fp32 scale per output
  channel that keeps any weight (:class:`~bnn_adapt.nn.quantizers.ChannelQuantizer`);
* ``i8``: post-training int8 (``export.dtype=int8``), one fp32 scale per row;
* ``sign``: a binary weight, one bit (1 = +1); ``bits``: a boolean mask.

Its *encoding* says which values are there: ``dense``; ``bitmask`` (a bit per
position, then the non-zeros) or ``gaps`` (the distances between non-zero
positions, one byte each, 255 meaning "255 further, continue"), whichever is
smallest for a pruned tensor; ``rows`` or ``columns`` (a bit per row or column,
then the kept ones) for structured pruning. Bit-packed parts start on a byte.
The reader needs the shape, codec and encoding of each record, in order; the
file lists only those that differ from the defaults its writer and reader
derive alike from the model (:mod:`bnn_adapt.adapters.file`).

Each stream is then compressed losslessly where that makes it smaller
(:func:`compress_streams`): the bytes of its floats regrouped by significance
(all first bytes, then all second bytes, ...: the sign and exponent bytes of
trained weights repeat a few values) and LZMA2 from the standard library. This
is what keeps a pruned adapter near its formula, whose pruned positions cost
bits the formula does not count; decompressed streams are byte for byte the
ones written.
"""

from __future__ import annotations

import lzma

import numpy as np
import torch

DTYPES = ("fp32", "fp16", "int8")
ENCODINGS = ("dense", "bitmask", "gaps", "rows", "columns")
STREAM_DTYPES = {"f32": np.float32, "f16": np.float16, "i8": np.int8, "u8": np.uint8}


def value_bits(codec: str) -> int:
    if codec in ("sign", "bits", "q1"):
        return 1
    if codec.startswith("q"):
        return int(codec[1:])
    return {"f32": 32, "f16": 16, "i8": 8}[codec]


def scaled(codec: str) -> bool:
    return codec == "i8" or codec.startswith("q")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes in [-L, L] (L = 2**(bits-1) - 1) as ``bits`` bits each, offset binary, little-endian bits;
    at 1 bit the sign (1 = positive)."""
    if bits == 1:
        return np.packbits(codes.reshape(-1) > 0, bitorder="little")
    unsigned = (codes.reshape(-1).astype(np.int64) + 2 ** (bits - 1) - 1).astype(np.uint32)
    planes = (unsigned[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(bool).reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(packed, count=count * bits, bitorder="little")
    if bits == 1:
        return np.where(flat.astype(bool), 1.0, -1.0).astype(np.float32)
    weights = 1 << np.arange(bits, dtype=np.int64)
    unsigned = (flat.reshape(count, bits).astype(np.int64) * weights).sum(axis=1)
    return (unsigned - (2 ** (bits - 1) - 1)).astype(np.float32)


def gap_bytes(nonzero: np.ndarray) -> np.ndarray:
    """Escape-coded distances between the positions of ``nonzero`` (flat), from position 0."""
    index = np.flatnonzero(nonzero.reshape(-1))
    gaps = np.diff(index, prepend=0)
    full, rest = np.divmod(gaps, 255)
    out = np.full(int(full.sum() + len(gaps)), 255, dtype=np.uint8)
    ends = np.cumsum(full + 1) - 1
    out[ends] = rest
    return out


def int8_rows(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output channel (dim 0): post-training (``export.dtype=int8``)."""
    scale = t.abs().reshape(t.shape[0], -1).amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).view(-1, *[1] * (t.dim() - 1))
    q = torch.round(t / safe).clamp(-127, 127)
    return q.numpy().astype(np.int8), scale.numpy().astype(np.float32)


class Streams:
    """What a writer appends records to; :meth:`arrays` are the file's tensors."""

    def __init__(self):
        self.f32: list[np.ndarray] = []
        self.f16: list[np.ndarray] = []
        self.i8: list[np.ndarray] = []
        self.u8: list[np.ndarray] = []

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name, dtype in STREAM_DTYPES.items():
            parts = getattr(self, name)
            if parts:
                out[name] = np.ascontiguousarray(np.concatenate([p.reshape(-1).astype(dtype) for p in parts]))
        return out

    def values(self, values: np.ndarray, codec: str) -> None:
        if codec in ("f32", "f16"):
            getattr(self, codec).append(values)
        elif codec == "i8":
            self.i8.append(values)
        elif codec in ("sign", "bits"):
            self.u8.append(np.packbits(values.reshape(-1).astype(bool), bitorder="little"))
        else:
            self.u8.append(pack_codes(values, value_bits(codec)))


_LZMA = {"format": lzma.FORMAT_RAW, "filters": [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]}


def compress_streams(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(arrays as stored, {stream: "lzma"})``: a stream is stored compressed (bytes regrouped by significance,
    then LZMA2) only where that is smaller; the others stay plain arrays."""
    stored, packing = {}, {}
    for name, values in arrays.items():
        planes = values.view(np.uint8).reshape(len(values), values.itemsize).T
        packed = lzma.compress(np.ascontiguousarray(planes).tobytes(), **_LZMA)
        if len(packed) < values.nbytes:
            stored[name], packing[name] = np.frombuffer(packed, dtype=np.uint8), "lzma"
        else:
            stored[name] = values
    return stored, packing


def decompress_streams(stored: dict[str, np.ndarray], packing: dict[str, str], limit: int) -> dict[str, np.ndarray]:
    """The plain streams back from :func:`compress_streams`' output; ValueError when a stream is damaged, of
    another type, or holds more than ``limit`` bytes in all (decompression stops there: a small stream that
    would inflate to gigabytes is refused after ``limit`` bytes)."""
    arrays, left = {}, limit
    for name, values in stored.items():
        how = packing.get(name)
        if name not in STREAM_DTYPES or how not in (None, "lzma"):
            raise ValueError(f"stream {name!r} is packed as {how!r}, which this version cannot read")
        dtype = np.dtype(np.uint8 if how else STREAM_DTYPES[name])
        if values.dtype != dtype or values.ndim != 1:
            raise ValueError(f"stream {name!r} is {values.dtype} of shape {list(values.shape)}, not a {dtype} vector")
        if how is None:
            arrays[name] = values
        else:
            arrays[name] = _inflate(name, values.tobytes(), left)
        left -= arrays[name].nbytes
        if left < 0:
            raise ValueError(f"the streams hold more than the {limit} bytes the adapter's records can need")
    if set(packing) - set(stored):
        raise ValueError(f"streams {sorted(set(packing) - set(stored))} are packed but absent")
    return arrays


def _inflate(name: str, packed: bytes, limit: int) -> np.ndarray:
    """One LZMA-packed stream, decompressed to at most ``limit`` bytes (+1 to tell a longer one). Its window
    needs no more than ``limit`` bytes either (no match reaches further back), not the writer's 64 MiB."""
    window = min(max(limit, 4096), 1 << 26)  # liblzma's smallest window and the writer's (preset 9)
    inflater = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": window}])
    try:
        raw = inflater.decompress(packed, max_length=limit + 1)
    except lzma.LZMAError as exc:
        raise ValueError(f"stream {name!r} is damaged ({exc})") from None
    if len(raw) > limit:
        raise ValueError(f"stream {name!r} inflates past the {limit} bytes the adapter's records can need")
    if not inflater.eof or inflater.unused_data:
        raise ValueError(f"stream {name!r} is damaged ({'cut short' if not inflater.eof else 'data after its end'})")
    dtype = np.dtype(STREAM_DTYPES[name])
    if len(raw) % dtype.itemsize:
        raise ValueError(f"stream {name!r} is damaged (its length is not whole {dtype.name} values)")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(-1)


class Cursor:
    """Reads records back from the file's arrays, in the order they were written."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.at = dict.fromkeys(("f32", "f16", "i8", "u8"), 0)

    def bytes_read(self) -> int:
        return sum(n * {"f32": 4, "f16": 2, "i8": 1, "u8": 1}[s] for s, n in self.at.items())

    def take(self, stream: str, count: int) -> np.ndarray:
        start = self.at[stream]
        found = self.arrays.get(stream, np.zeros(0))[start : start + count]
        if len(found) != count:
            raise ValueError(f"the file's {stream} array ends early")
        self.at[stream] = start + count
        return found

    def bits(self, count: int) -> np.ndarray:
        packed = self.take("u8", (count + 7) // 8)
        return np.unpackbits(packed, count=count, bitorder="little").astype(bool)

    def values(self, count: int, codec: str) -> np.ndarray:
        if codec in ("f32", "f16", "i8"):
            return self.take(codec, count).astype(np.float32)
        if codec == "sign":
            return np.where(self.bits(count), 1.0, -1.0).astype(np.float32)
        if codec == "bits":
            return self.bits(count)
        width = value_bits(codec)
        return unpack_codes(self.take("u8", (count * width + 7) // 8), count, width)

    def gaps(self, nnz: int, numel: int) -> np.ndarray:
        """Positions of ``nnz`` non-zeros among ``numel`` from escape-coded gaps."""
        if nnz == 0:
            return np.zeros(0, np.int64)
        stream, start = self.arrays.get("u8", np.zeros(0, np.uint8)), self.at["u8"]
        ends = np.flatnonzero(stream[start:] != 255)[:nnz]
        if len(ends) < nnz:
            raise ValueError("the file's u8 array ends early")
        chunk = self.take("u8", int(ends[-1]) + 1).astype(np.int64)
        index = np.cumsum(chunk)[chunk != 255]
        if index[-1] >= numel or (len(index) > 1 and not (np.diff(index) > 0).all()):
            raise ValueError("its gaps point outside the tensor or twice at one position")
        return index

    def unread(self) -> dict[str, int]:
        """Values of each stream that no record has read (a complete file leaves none)."""
        left = {name: len(values) - self.at.get(name, 0) for name, values in self.arrays.items()}
        return {name: n for name, n in left.items() if n}


def _cost(codec: str, count: int) -> float:
    return count * value_bits(codec) / 8


def choose_encoding(values: torch.Tensor, codec: str) -> str:
    """dense, bitmask or gaps: whichever stores ``values`` in fewest bytes (zeros are pruned weights; a
    1-bit code cannot hold a zero, so a ``q1`` tensor with zeros is never dense)."""
    if codec in ("sign", "bits") or values.numel() < 2:
        return "dense"  # a zero binary weight still means +1
    nonzero = (values.detach().cpu() != 0).numpy()
    nnz, numel = int(nonzero.sum()), values.numel()
    costs = {"bitmask": (numel + 7) // 8 + _cost(codec, nnz), "gaps": len(gap_bytes(nonzero)) + _cost(codec, nnz)}
    if not (codec == "q1" and nnz < numel):
        costs["dense"] = _cost(codec, numel)
    return min(costs, key=lambda k: (costs[k], k != "dense"))


def write_record(
    streams: Streams,
    t: torch.Tensor,
    codec: str,
    enc: str = "dense",
    scale: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> dict:
    """Append ``t`` (for ``q*`` codecs: its integer codes, with ``scale``) to ``streams``; returns the
    record's extra fields (``nnz`` for gaps). ``keep``: the kept rows or columns (``rows``/``columns``)."""
    t = t.detach().cpu()
    flat_scale = None
    if codec == "i8":
        values, flat_scale = int8_rows(t.float())
        t = torch.from_numpy(values.astype(np.float32))
    elif codec.startswith("q"):
        flat_scale = scale.detach().cpu().float().numpy()
    full = t.numpy() if t.dtype == torch.bool else t.float().numpy()
    extra = {}
    if enc in ("rows", "columns"):
        keep_np = keep.cpu().numpy().astype(bool)
        streams.values(keep_np, "bits")
        kept = full[keep_np] if enc == "rows" else full[:, keep_np]
        streams.values(kept, codec)
    elif enc == "dense":
        streams.values(full, codec)
    else:
        nonzero = full != 0
        if enc == "bitmask":
            streams.values(nonzero, "bits")
        else:
            streams.u8.append(gap_bytes(nonzero))
            extra["nnz"] = int(nonzero.sum())
        streams.values(full[nonzero], codec)
    if flat_scale is not None:
        rows = full.reshape(full.shape[0], -1) if full.ndim else full.reshape(1, -1)
        live = (rows != 0).any(axis=1) if codec.startswith("q") else np.ones(len(rows), bool)
        streams.values(flat_scale[live], "f32")
    return extra


def read_record(
    cursor: Cursor, shape: list[int], codec: str, enc: str = "dense", nnz: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensor a record holds (fp32, or bool for ``bits``; ``q*``: ``scale * code``), and its scales (``q*``)."""
    numel = int(np.prod(shape)) if shape else 1
    if (enc == "rows" and not shape) or (enc == "columns" and len(shape) != 2):
        raise ValueError(f"a tensor of shape {list(shape)} cannot be stored by {enc}")
    if enc == "gaps" and not (isinstance(nnz, int) and not isinstance(nnz, bool) and 0 <= nnz <= numel):
        raise ValueError(f"it declares {nnz!r} non-zeros in {numel} values")
    full = np.zeros(numel, dtype=bool if codec == "bits" else np.float32)
    if enc in ("rows", "columns"):
        keep = cursor.bits(shape[0] if enc == "rows" else shape[1])
        full = full.reshape(shape)
        per = int(np.prod(shape[1:])) if enc == "rows" else shape[0]
        values = cursor.values(int(keep.sum()) * per, codec)
        if enc == "rows":
            full[keep] = values.reshape(-1, *shape[1:])
        else:
            full[:, keep] = values.reshape(shape[0], -1)
    elif enc == "dense":
        full = cursor.values(numel, codec)
    else:
        index = np.flatnonzero(cursor.bits(numel)) if enc == "bitmask" else cursor.gaps(nnz, numel)
        full[index] = cursor.values(len(index), codec)
    codes = torch.from_numpy(np.array(full).reshape(shape))
    if not scaled(codec):
        return codes, None
    rows = codes.reshape(codes.shape[0], -1) if codes.dim() else codes.reshape(1, -1)
    live = (rows != 0).any(dim=1) if codec.startswith("q") else torch.ones(len(rows), dtype=torch.bool)
    scale = torch.zeros(len(rows))
    scale[live] = torch.from_numpy(cursor.values(int(live.sum()), "f32").copy())
    from bnn_adapt.nn.quantizers import dequantize  # noqa: PLC0415 - the one place scale * code is computed

    return dequantize(codes, scale), scale


def most_bytes(shape) -> int:
    """The most bytes one record of ``shape`` can take in any codec and encoding: 4 per value, then a position
    byte per value (a bitmask bit, a gap byte and its 255 escapes, a kept row or column bit), an fp32 scale per row."""
    numel = int(np.prod(shape)) if len(shape) else 1
    return 5 * numel + numel // 255 + 1 + 4 * (shape[0] if len(shape) else 1)
