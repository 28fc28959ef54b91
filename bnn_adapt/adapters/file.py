"""Adapter files: one adapter + its head as a small ``.safetensors`` file, and that file read back.

The file holds the adapter's and the head's tensors as the model runs them (BatchNorms folded,
weights below 32 bits at their width, pruned rows and columns left out; :mod:`.file_records`), the
base tensors the adapted model no longer shares with the stored base, and a JSON metadata block
(strategy, options, class names, preprocessing, the base's fingerprint, a layout hash): docs/deployment.md,
"What the files hold". A file may come from anyone, so reading checks it before trusting it (metadata
first, :mod:`.file_meta`; then the declared model on the meta device bounds what the streams may hold);
any fault is one :class:`ExportError` line (docs/deployment.md, "Files from others").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save
from torch import nn

from bnn_adapt.adapters.file_codec import DTYPES, compress_streams, decompress_streams, most_bytes
from bnn_adapt.adapters.file_layout import default_codec, layout, layout_hash, parts
from bnn_adapt.adapters.file_meta import ADAPTER_SCALE, FORMAT, METADATA_KEY, VERSION, checked_meta, refused, shown
from bnn_adapt.adapters.file_records import RecordReader, RecordWriter, read_part, write_part
from bnn_adapt.adapters.strategy import STRATEGIES, make_head_prunable, substituted
from bnn_adapt.bases.base import rebuild
from bnn_adapt.bases.fingerprint import canonical_tensors, fingerprint, fold_norms, norms_folded
from bnn_adapt.bases.received import checked_arch
from bnn_adapt.errors import ConfigError, ExportError, FingerprintError, printable
from bnn_adapt.files import atomic_output
from bnn_adapt.nn.layers import ColumnPrunedLinear

ADAPTER_FILE = "adapter.safetensors"  # what an adaptation run writes in its directory


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
    records = RecordWriter(dtype)
    for prefix, part, pairs in parts(model):
        write_part(records, prefix, part, pairs, model.kept_rows() if part is model.adapter else {})
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
    with atomic_output(path) as tmp:  # written by Python: a full disk is an OSError, which names its errno
        tmp.write_bytes(save(arrays, metadata={METADATA_KEY: json.dumps(meta, separators=(",", ":"))}))
    return meta


def is_adapter_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file with this format's metadata."""
    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get(METADATA_KEY) is not None
    except (SafetensorError, OSError, ValueError):
        return False


def _build(meta: dict, base: nn.Module, path: Path) -> nn.Module:
    """The adapted model ``meta`` declares, on ``base``; options that do not fit the base are one line."""
    try:
        model = STRATEGIES[meta["strategy"]](base, meta["num_classes"], freeze_bn=True, **meta["options"])
        if meta["head_columns"]:
            make_head_prunable(model)
    except (ConfigError, ValueError, TypeError, RuntimeError) as exc:
        raise refused(path, f"its {meta['strategy']} options do not fit its base ({printable(exc)})") from None
    return model


def _model_on_meta(meta: dict, path: Path) -> nn.Module:
    """The declared model, built on the meta device (shapes only, nothing allocated): its base a known
    architecture within sane limits, its adapter small beside that base, its records the ones this
    version writes for it (:func:`layout_hash`)."""
    base = meta["base"]
    config = checked_arch(base["arch"], base["arch_config"], f"adapter file {path}: its base", error=ExportError)
    with torch.device("meta"):
        model = _build(meta, rebuild(base["arch"], config), path)
    size = sum(p.numel() for p in model.adapter.parameters()) if model.adapter is not None else 0
    if size > ADAPTER_SCALE * sum(p.numel() for p in model.base.parameters()):
        raise refused(
            path,
            f"its {meta['strategy']} options build an adapter of {size:,} parameters, "
            f"more than {ADAPTER_SCALE} times its base's",
        )
    if meta["layout"] != layout_hash(model):
        raise ExportError(
            f"adapter {path} does not fit the {meta['strategy']} adapter this version builds from its options; "
            "export it again with the version that trained it"
        )
    return model


def _most_bytes(model: nn.Module, meta: dict, path: Path) -> int:
    """The most bytes the streams of a file for ``model`` can hold: :func:`most_bytes` of every record."""
    shapes = [shape for _, kind, shape in layout(model) for _ in range(2 if kind in ("norm", "pair") else 1)]
    state = {k: tuple(v.shape) for k, v in model.base.state_dict().items()}
    for name in meta["base_tensors"]:
        weight = f"{name.removesuffix('.scale')}.weight"  # a ReActNet conv's scale: one value per output channel
        if name in state or (name.endswith(".scale") and weight in state):
            shapes.append(state[name] if name in state else state[weight][:1])
        else:
            raise refused(path, f"base_tensors names {shown(name)}, which its {meta['base']['arch']} base lacks")
    return sum(most_bytes(shape) for shape in shapes)


def _read_stored(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays as stored, checked metadata)``: the arrays take at most the file's own size."""
    if not path.is_file():
        raise ExportError(f"adapter file {path} does not exist; write one with task=export export.adapter_run=RUN_DIR")
    try:
        with safe_open(str(path), framework="np") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ExportError(f"{path} is not a safetensors file ({printable(exc)[:200]})") from None
    if raw is None:
        raise ExportError(
            f"{path} holds no {METADATA_KEY} metadata: it is no adapter file written by task=export or an "
            "adaptation run of this version; run the adaptation again with this bnn_adapt"
        )
    meta = checked_meta(raw, path)
    meta["class_names"] = meta["class_names"] or _indices(meta["num_classes"])
    return stored, meta


def _streams(stored: dict[str, np.ndarray], meta: dict, path: Path) -> dict[str, np.ndarray]:
    """The plain streams, decompressed never past the most bytes the declared model's records can need."""
    limit = _most_bytes(_model_on_meta(meta, path), meta, path)
    try:
        return decompress_streams(stored, meta["packing"], limit)
    except ValueError as exc:
        raise ExportError(f"{path} cannot be read: {exc}; export the adapter again") from None


def read_adapter_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(streams, metadata)`` of an exported adapter, the metadata checked first (:func:`~bnn_adapt.adapters.file_meta.checked_meta`)."""
    stored, meta = _read_stored(Path(path))
    return _streams(stored, meta, Path(path)), meta


class AttachedAdapter(nn.Module):
    """An exported adapter rebuilt on a (shared) base; ``forward`` gives logits. ``meta["records"]``
    says how each tensor was stored: codec, encoding and bytes."""

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


def attach_adapter(
    path: str | Path, base: nn.Module, base_fingerprint: str | None = None, name: str | None = None
) -> AttachedAdapter:
    """Rebuild the adapter in ``path`` on ``base``; refused when it was trained on another base."""
    path = Path(path)
    stored, meta = _read_stored(path)
    ours = base_fingerprint or fingerprint(base)
    theirs = meta["base"]["fingerprint"]
    if theirs != ours:
        raise FingerprintError(
            f"adapter {path} was exported for the base with fingerprint {printable(theirs)[:64]}, but the loaded "
            f"base has fingerprint {ours}; load the base it was trained on (its export's manifest.json names it)"
        )
    arrays = _streams(stored, meta, path)  # bounded by the model on this very base (the fingerprint covers it)
    if not norms_folded(base):
        base = fold_norms(copy.deepcopy(base))  # the file's BN values are folded ones (identical outputs)
    model = _build(meta, base, path)
    reader = RecordReader(arrays, meta, path)
    for prefix, part, pairs in parts(model):
        read_part(reader, prefix, part, pairs)
    canonical = {n: (k, t.shape) for n, k, t in canonical_tensors(base)}
    base_tensors = {}
    for tensor in meta["base_tensors"]:
        if tensor not in canonical:
            raise refused(path, f"base_tensors names {shown(tensor)}, which its base does not store")
        kind, shape = canonical[tensor]
        default = default_codec("sign" if kind == "bits" else "value", meta["dtype"], len(shape))
        base_tensors[tensor] = reader.read(f"base.{tensor}", shape, default)[0]
    reader.finish()
    model.pruned = meta["pruned"]
    model.eval()
    return AttachedAdapter(model, base_tensors, meta, name or path.stem)


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
