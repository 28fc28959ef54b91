"""A model part's tensors as the records of an adapter file, written and read back in one order.

The writer and the reader walk the same slots (:func:`~bnn_adapt.adapters.file_layout.slots`): a
BatchNorm as its folded scale and shift, a weight trained below 32 bits as its codes and scales, pruned
rows and columns left out; each record in the smallest encoding (:mod:`.file_codec`). Reading checks
every record's codec, that its values are finite, and that the streams end with the last record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_adapt.adapters.file_codec import Cursor, Streams, choose_encoding, read_record, write_record
from bnn_adapt.adapters.file_layout import default_codec, load_part, slots
from bnn_adapt.adapters.file_meta import refused, shown
from bnn_adapt.errors import ExportError
from bnn_adapt.files import require_finite
from bnn_adapt.nn.folding import BatchNorm, fold_batch_norm, mark_folded
from bnn_adapt.nn.layers import ColumnPrunedLinear, quantized_weight, weight_bits
from bnn_adapt.nn.quantizers import ChannelQuantizer


def _int8_pays(t: torch.Tensor) -> bool:
    """int8 values (1 byte) plus an fp32 scale per row beat fp16 (2 bytes) only with > 4 values a row."""
    return int(t.count_nonzero()) > 4 * t.shape[0]


class RecordWriter:
    """Writes records into streams, noting the encodings that differ from the defaults."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.streams = Streams()
        self.encodings: dict[str, dict] = {}

    def add(self, name: str, t: torch.Tensor, default: str, scale=None, keep=None, enc: str | None = None) -> None:
        """``enc``: ``rows``/``columns`` (with ``keep``), ``dense``, or None: the smallest of dense and sparse."""
        codec = default
        if codec == "i8" and not _int8_pays(t):
            codec = "f16"
        if codec == "sign":
            t = t >= 0
        if enc in ("rows", "columns"):
            kept = t[keep] if enc == "rows" else t[:, keep]
            if keep.all() or (codec == "q1" and bool((kept == 0).any())):  # a 1-bit code cannot hold a zero
                enc = None
        if enc is None:
            enc, keep = choose_encoding(t, codec), None
        extra = write_record(self.streams, t, codec, enc, scale, keep)
        entry = {**({"codec": codec} if codec != default else {}), **({"enc": enc} if enc != "dense" else {}), **extra}
        if entry:
            self.encodings[name] = entry


@torch.no_grad()
def write_part(records: RecordWriter, prefix: str, part: nn.Module, pairs: dict, kept_rows: dict) -> None:
    state, modules = part.state_dict(), dict(part.named_modules())
    for key, kind, detail in slots(part, pairs):
        owner = key.rpartition(".")[0]
        value = state[key]
        default = default_codec(kind, records.dtype, value.dim(), detail)
        if kind == "norm":
            scale, shift = fold_batch_norm(modules[detail])
            rows = kept_rows.get(detail)
            records.add(prefix + key, scale, default, keep=rows, enc="dense" if rows is None else "rows")
            records.add(f"{prefix}{detail + '.' if detail else ''}bias", shift, default, enc="dense")
        elif kind == "pair":
            bias_key, bn = detail
            scale, shift = fold_batch_norm(bn, weight=value, bias=state[bias_key])
            records.add(prefix + key, scale, default, enc="dense")
            records.add(prefix + bias_key, shift, default, enc="dense")
        else:
            module = modules[owner]
            columns = module.kept_columns if isinstance(module, ColumnPrunedLinear) and key.endswith("weight") else None
            scale = None
            if kind == "quantized":
                value, scale = quantized_weight(module)
            elif columns is not None and kind == "value":
                value = value * columns.to(value.dtype)  # zero the switched-off columns: no int8 scale inflated by them
            if columns is not None and not columns.all():
                records.add(prefix + key, value, default, scale=scale, keep=columns, enc="columns")
            elif owner in kept_rows:
                records.add(prefix + key, value, default, scale=scale, keep=kept_rows[owner], enc="rows")
            else:
                records.add(prefix + key, value, default, scale=scale)


class RecordReader:
    """A file's records, read in the order they were written: each codec must be the record's own, each
    tensor finite, and the streams must end with the last record. How each was stored and how many bytes
    it took go to ``meta["records"]``."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict, path: Path):
        self.cursor, self.meta, self.path = Cursor(arrays), meta, path
        meta["records"] = {}

    def read(self, name: str, shape, default: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        entry = self.meta["encodings"].get(name, {})
        codec, enc, start = entry.get("codec", default), entry.get("enc", "dense"), self.cursor.bytes_read()
        if codec not in (default, "f16" if default == "i8" else default):
            raise refused(self.path, f"tensor {name} is stored as {shown(codec)}, not {default}")
        try:
            found = read_record(self.cursor, list(shape), codec, enc, entry.get("nnz"))
        except ValueError as exc:
            raise refused(self.path, f"tensor {name} cannot be read: {exc}") from None
        require_finite({name: found[0], f"{name} (scales)": found[1]}, f"adapter file {self.path}", ExportError)
        self.meta["records"][name] = {"codec": codec, "enc": enc, "bytes": self.cursor.bytes_read() - start}
        return found

    def finish(self) -> None:
        unread = self.cursor.unread()
        if unread:
            stream, count = next(iter(unread.items()))
            raise refused(self.path, f"its {stream} stream holds {count} values beyond its last tensor")
        unknown = sorted(set(self.meta["encodings"]) - set(self.meta["records"]))
        if unknown:
            raise refused(self.path, f"encodings name {shown(unknown[0])}, which is no tensor of its adapter")


@torch.no_grad()
def read_part(reader: RecordReader, prefix: str, part: nn.Module, pairs: dict) -> None:
    """Load ``part`` from its records: folded norms (``FOLDED_EPS``), quantised weights with their stored scales."""
    state, modules, dtype = part.state_dict(), dict(part.named_modules()), reader.meta["dtype"]
    tensors, scales = {}, {}
    for key, kind, detail in slots(part, pairs):
        default = default_codec(kind, dtype, state[key].dim(), detail)
        shape = state[key].shape
        if kind == "norm":
            at = f"{detail}." if detail else ""
            tensors[key] = reader.read(prefix + key, shape, default)[0]
            tensors[f"{at}bias"] = reader.read(f"{prefix}{at}bias", shape, default)[0]
            tensors[f"{at}running_mean"], tensors[f"{at}running_var"] = torch.zeros(shape), torch.ones(shape)
        elif kind == "pair":
            tensors[key] = reader.read(prefix + key, shape, default)[0]
            tensors[detail[0]] = reader.read(prefix + detail[0], shape, default)[0]
        else:
            tensors[key], scale = reader.read(prefix + key, shape, default)
            if kind == "quantized":
                scales[key.rpartition(".")[0]] = scale
    load_part(part, tensors, prefix.rstrip("."))
    for m in modules.values():
        if isinstance(m, BatchNorm):
            mark_folded(m)
    for owner, scale in scales.items():
        modules[owner].weight_quantizer = ChannelQuantizer(weight_bits(modules[owner]), scale=scale)
