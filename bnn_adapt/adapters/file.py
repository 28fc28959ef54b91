"""Adapter files: one adapter + its head as a small ``.safetensors`` file.

What goes in: the adapter's and the head's tensors, and ``base.*``: base
tensors the adapted model no longer shares with the stored base (every body
tensor for ``full_finetune``; the drifted or recalibrated BN statistics of a
``base.bn=adapt`` or ``recalibrate`` run; nothing otherwise), applied while
this adapter runs. As the model holds them for inference:

* a weight trained below 32 bits (``adapter.bits``) at that width, bit-packed,
  with its fp32 scale per output channel: the very values training computed
  with; binary weights (a binary head's) as one bit each;
* every BatchNorm folded (:mod:`bnn_adapt.nn.folding`): one scale and one shift
  per channel, rebuilt as running mean 0, variance 1, ``FOLDED_EPS`` with bit-identical
  outputs (BitFit's copies of the base's BN pairs are folded with the base's
  statistics, and attach onto a base whose norms are folded too);
* other values as ``export.dtype`` says: ``fp32`` (exact), ``fp16``, or
  ``int8`` (every >= 2-D weight as int8 with one fp32 scale per output channel,
  where that pays; 1-D tensors as fp16). Weights trained below 32 bits and
  their scales keep their own width.

Pruned weights are stored compactly, whichever is smallest: dense, a bitmask
plus the kept values, or the gaps between kept positions plus the values.
Structured pruning is physically removed:

* a pruned depthwise filter of a UDTA thin block (thesis 6.4) goes with its BN
  scale. Its channel still carries the residual: ``h_i = ReLU(BN(0)_i) + x_i =
  ReLU(shift_i) + x_i``, so the pointwise conv keeps input column i and the
  folded shift stays (one value for 9 weights + 2 BN parameters);
* a pruned classifier column (``reduction.head_rate``) is not stored at all.

The values of all tensors share a few arrays (:mod:`.file_codec`), in the
order of the state dicts of the model that the metadata rebuilds: a JSON block
in the safetensors metadata (key ``bnn_adapt``) with the strategy and its
options, class names, the preprocessing, the base's fingerprint (loading onto
another base is refused), a hash of that order, and the encodings that differ
from the defaults. Each array is stored LZMA-compressed where that is smaller
(lossless; ``packing`` in the metadata names them): a pruned tensor's positions
cost bits the size formula does not count, which compression wins back.
Version-2 files (plain arrays) and version-1 files (one array per tensor, BN
unfolded) still load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from bnn_adapt.adapters.bitfit import substituted
from bnn_adapt.adapters.file_codec import (
    DTYPES,
    Cursor,
    Streams,
    choose_encoding,
    compress_streams,
    decompress_streams,
    read_record,
    write_record,
)
from bnn_adapt.adapters.file_layout import default_codec, layout_hash, load_part, slots
from bnn_adapt.adapters.file_v1 import attach_v1
from bnn_adapt.adapters.strategy import make_head_prunable
from bnn_adapt.adapters.udta import ThinBlock
from bnn_adapt.bases.fingerprint import canonical_tensors, fingerprint, fold_norms, norms_folded
from bnn_adapt.errors import ConfigError, ExportError, FingerprintError
from bnn_adapt.files import atomic_output
from bnn_adapt.nn.folding import BatchNorm, fold_batch_norm, mark_folded
from bnn_adapt.nn.layers import ColumnPrunedLinear, quantized_weight, weight_bits
from bnn_adapt.nn.quantizers import ChannelQuantizer

FORMAT = "bnn_adapt.adapter"
VERSION = 3  # 3: streams compressed where that pays; 2: plain streams; 1: an array per tensor
METADATA_KEY = "bnn_adapt"
ADAPTER_FILE = "adapter.safetensors"  # what an adaptation run writes in its directory


# --------------------------------------------------------------------------- writing


def _int8_pays(t: torch.Tensor) -> bool:
    """int8 values (1 byte) plus an fp32 scale per row beat fp16 (2 bytes) only with > 4 values a row."""
    return int(t.count_nonzero()) > 4 * t.shape[0]


class _Records:
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


def _dead_rows(part: nn.Module) -> dict[str, torch.Tensor]:
    """Kept-row masks by module name: a UDTA thin block's depthwise conv and BN lose their dead filters."""
    found = {}
    for name, m in part.named_modules():
        if isinstance(m, ThinBlock):
            dead = (m.depthwise.weight.detach().flatten(1) == 0).all(dim=1)
            if dead.any():
                at = f"{name}." if name else ""
                found[f"{at}depthwise"] = found[f"{at}depthwise_norm"] = ~dead
    return found


@torch.no_grad()
def _write_part(records: _Records, prefix: str, part: nn.Module, base: nn.Module) -> None:
    state, modules = part.state_dict(), dict(part.named_modules())
    kept_rows = _dead_rows(part)
    for key, kind, detail in slots(part, base):
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


def base_differences(base: nn.Module, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Base tensors (in packed form: signs as +-1) that differ from ``reference``; the classifier is ignored."""
    ours = {n: (k, t) for n, k, t in canonical_tensors(base) if not n.startswith("classifier.")}
    theirs = {n: t for n, k, t in canonical_tensors(reference)}
    if set(ours) - set(theirs):
        extra = sorted(set(ours) - set(theirs))[:3]
        raise ExportError(f"the adapted model's base does not match the reference base ({extra})")
    return {
        n: (torch.where(t, 1.0, -1.0) if kind == "bits" else t)
        for n, (kind, t) in ours.items()
        if not torch.equal(t, theirs[n])
    }


def _indices(num_classes: int) -> list[str]:
    """The class names a file stores as none."""
    return [str(i) for i in range(num_classes)]


def export_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    reference_base: nn.Module | None = None,
    dtype: str = "fp32",
    class_names: list[str] | None = None,
    preprocess: dict | None = None,
    source: dict | None = None,
) -> dict:
    """Write ``model``'s adapter + head (see the module docstring); returns the metadata.

    ``reference_base`` is the base the file will be attached to (as stored,
    e.g. from ``base.checkpoint``); None: ``model.base`` itself.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"export.dtype={dtype!r} is invalid: use one of {', '.join(DTYPES)}")
    reference = model.base if reference_base is None else reference_base
    records = _Records(dtype)
    for prefix, part in (("adapter.", model.adapter), ("head.", model.head)):
        if part is not None:
            _write_part(records, prefix, part, model.base)
    differences = base_differences(model.base, reference)
    kinds = {n: kind for n, kind, _ in canonical_tensors(reference)}  # as attach_adapter reads them back
    for name, t in differences.items():
        records.add(f"base.{name}", t, default_codec("sign" if kinds[name] == "bits" else "value", dtype, t.dim()))
    names = [str(c) for c in class_names or ()]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "strategy": model.strategy,
        "options": model.options,
        "num_classes": model.num_classes,
        "class_names": names if names and names != _indices(model.num_classes) else None,  # None: "0" ... "N-1"
        "head_columns": any(isinstance(m, ColumnPrunedLinear) for m in model.head.modules()),
        "pruned": bool(model.pruned),
        "base": {"arch": reference.arch, "arch_config": reference.arch_config(), "fingerprint": fingerprint(reference)},
        "dtype": dtype,
        "preprocess": preprocess,
        "source": source or {},
        "layout": layout_hash(model),
        "base_tensors": list(differences),
        "encodings": records.encodings,  # records not listed: dense, at their default codec
    }
    arrays, meta["packing"] = compress_streams(records.streams.arrays())
    with atomic_output(path) as tmp:
        save_file(arrays, str(tmp), metadata={METADATA_KEY: json.dumps(meta, separators=(",", ":"))})
    return meta


# --------------------------------------------------------------------------- reading


def is_adapter_file(path: str | Path) -> bool:
    """Whether ``path`` is an adapter file of this format (0.1's training runs wrote another)."""
    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get(METADATA_KEY) is not None
    except (SafetensorError, OSError, ValueError):
        return False


def read_adapter_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(stored arrays, metadata)`` of an exported adapter."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"adapter file {path} does not exist; write one with task=export export.adapter_run=RUN_DIR")
    try:
        with safe_open(str(path), framework="np") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a safetensors file ({exc})") from None
    if raw is None:
        raise ExportError(
            f"{path} is not an adapter file of this version (bnn_adapt 0.1's training runs wrote their "
            f"{ADAPTER_FILE} in another format); upgrade it with: python -m bnn_adapt task=export "
            f"export.adapter_run=[{path.parent}] export.dir={path.parent / 'export'}"
        )
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} holds {meta.get('format')!r}, not an exported adapter")
    if meta.get("version", 1) > VERSION:
        raise ExportError(f"{path} is an adapter file of format version {meta['version']}, newer than this "
                          f"bnn_adapt reads ({VERSION}); upgrade bnn_adapt")  # fmt: skip
    meta["class_names"] = meta.get("class_names") or _indices(meta["num_classes"])
    try:
        arrays = decompress_streams(arrays, meta.get("packing", {}))
    except ValueError as exc:
        raise ExportError(f"{path} cannot be read: {exc}; export the adapter again") from None
    return arrays, meta


class AttachedAdapter(nn.Module):
    """An exported adapter rebuilt on a (shared) base; ``forward`` gives logits. ``meta["records"]``
    (format 2) says how each tensor was stored: codec, encoding and bytes."""

    def __init__(self, model: nn.Module, base_overrides: dict[str, torch.Tensor], meta: dict, name: str):
        super().__init__()
        self.model = model
        self.base_overrides = base_overrides
        self.meta = meta
        self.name = name
        self.class_names: list[str] = meta["class_names"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with substituted(self.model.base, self.base_overrides):
            return self.model(x)


def _read(cursor: Cursor, meta: dict, name: str, shape, default: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One record; what it was and how many bytes it took go to ``meta["records"]``."""
    entry = meta["encodings"].get(name, {})
    codec, enc, start = entry.get("codec", default), entry.get("enc", "dense"), cursor.bytes_read()
    found = read_record(cursor, list(shape), codec, enc, entry.get("nnz"))
    meta.setdefault("records", {})[name] = {"codec": codec, "enc": enc, "bytes": cursor.bytes_read() - start}
    return found


@torch.no_grad()
def _read_part(cursor: Cursor, meta: dict, prefix: str, part: nn.Module, base: nn.Module) -> None:
    """Load ``part`` from its records: folded norms (``FOLDED_EPS``), quantised weights with their stored scales."""
    state, modules, dtype = part.state_dict(), dict(part.named_modules()), meta["dtype"]
    tensors, scales = {}, {}
    for key, kind, detail in slots(part, base):
        default = default_codec(kind, dtype, state[key].dim(), detail)
        shape = state[key].shape
        if kind == "norm":
            at = f"{detail}." if detail else ""
            tensors[key] = _read(cursor, meta, prefix + key, shape, default)[0]
            tensors[f"{at}bias"] = _read(cursor, meta, f"{prefix}{at}bias", shape, default)[0]
            tensors[f"{at}running_mean"], tensors[f"{at}running_var"] = torch.zeros(shape), torch.ones(shape)
        elif kind == "pair":
            tensors[key] = _read(cursor, meta, prefix + key, shape, default)[0]
            tensors[detail[0]] = _read(cursor, meta, prefix + detail[0], shape, default)[0]
        else:
            tensors[key], scale = _read(cursor, meta, prefix + key, shape, default)
            if kind == "quantized":
                scales[key.rpartition(".")[0]] = scale
    load_part(part, tensors, prefix.rstrip("."))
    for m in modules.values():
        if isinstance(m, BatchNorm):
            mark_folded(m)
    for owner, scale in scales.items():
        modules[owner].weight_quantizer = ChannelQuantizer(weight_bits(modules[owner]), scale=scale)


def attach_adapter(path: str | Path, base: nn.Module, base_fingerprint: str | None = None, name: str | None = None
                   ) -> AttachedAdapter:  # fmt: skip
    """Rebuild the adapter in ``path`` on ``base``; refused when it was trained on another base."""
    from bnn_adapt.adapters import STRATEGIES  # noqa: PLC0415 - strategies import this package's adapters

    arrays, meta = read_adapter_file(path)
    ours = base_fingerprint or fingerprint(base)
    theirs = meta["base"]["fingerprint"]
    if theirs != ours:
        raise FingerprintError(
            f"adapter {path} was exported for the base with fingerprint {theirs}, but the loaded base has "
            f"fingerprint {ours}; load the base it was trained on (its export's manifest.json names it)"
        )
    if meta["strategy"] not in STRATEGIES:
        raise ExportError(f"adapter {path} uses strategy {meta['strategy']!r}, unknown to this version")
    if meta.get("version", 1) >= 2 and not norms_folded(base):
        base = fold_norms(copy.deepcopy(base))  # the file's BN values are folded ones (identical outputs)
    model = STRATEGIES[meta["strategy"]](base, meta["num_classes"], freeze_bn=True, **meta["options"])
    if meta["head_columns"]:
        make_head_prunable(model)
    if meta.get("version", 1) < 2:
        base_tensors = attach_v1(model, arrays, meta, Path(path))
    else:
        if meta["layout"] != layout_hash(model):
            raise ExportError(f"adapter {path} does not fit the {meta['strategy']} adapter this version builds from "
                              "its options; export it again with the version that trained it")  # fmt: skip
        cursor = Cursor(arrays)
        for prefix, part in (("adapter.", model.adapter), ("head.", model.head)):
            if part is not None:
                _read_part(cursor, meta, prefix, part, base)
        canonical = {n: (k, t.shape) for n, k, t in canonical_tensors(base)}
        base_tensors = {}
        for name in meta["base_tensors"]:
            kind, shape = canonical[name]
            default = default_codec("sign" if kind == "bits" else "value", meta["dtype"], len(shape))
            base_tensors[name] = _read(cursor, meta, f"base.{name}", shape, default)[0]
    model.pruned = bool(meta["pruned"])
    model.eval()
    return AttachedAdapter(model, base_tensors, meta, name or Path(path).stem)


def stored_tensors(path: str | Path, base: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the file determines, at full shape, by name (``adapter.*``, ``head.*``, ``base.*``), as the
    model attached from it holds them: a folded BN's weight and bias are its scale and shift (its running
    statistics, 0 and 1, are not stored); a quantised weight is ``scale * code``."""
    attached = attach_adapter(path, base)
    out = {}
    for prefix, part in (("adapter.", attached.model.adapter), ("head.", attached.model.head)):
        for key, value in (part.state_dict() if part is not None else {}).items():
            stored = value.is_floating_point() or value.dtype == torch.bool
            if stored and not key.endswith(("running_mean", "running_var")):
                out[prefix + key] = value
    return out | {f"base.{k}": v for k, v in attached.base_overrides.items()}
