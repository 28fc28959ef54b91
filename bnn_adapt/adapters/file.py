"""Adapter files: one adapter + its head as a small ``.safetensors`` file.

What goes in (each tensor under ``adapter.``, ``head.`` or ``base.``):

* the adapter's and the head's state dicts; binary weights (a binary head's)
  as one bit each; other values as ``export.dtype`` says: ``fp32`` (exact),
  ``fp16``, or ``int8`` (every >= 2-D weight as int8 with one fp32 scale per
  output channel; 1-D tensors such as BN parameters as fp16);
* ``base.*``: base tensors the adapted model no longer shares with the
  stored base (every body tensor for ``full_finetune``; the drifted BN
  statistics of a ``base.bn=adapt`` run; nothing otherwise), applied while
  this adapter runs.

Pruned weights are stored compactly, whichever is smallest: dense, a bitmask
plus the kept values, or the gaps between kept positions plus the values.
Structured pruning is physically removed:

* a pruned depthwise filter of a UDTA thin block (thesis 6.4) goes with its BN
  entries. Its channel still carries the residual: ``h_i = ReLU(BN(0)_i) + x_i``,
  so the pointwise conv keeps input column i, and the constant ``ReLU(BN(0)_i)``
  is stored instead (one value for 9 weights + 4 BN values). Loading rebuilds
  the block with that channel's BN as gamma=0, beta=the constant, mean=0, var=1,
  which yields the very same value: fp32 predictions are bit-identical;
* a pruned classifier column (``reduction.head_rate``) is not stored at all.

A JSON block in the safetensors metadata (key ``bnn_adapt``) says how to
rebuild: strategy and its options, class names, the preprocessing, the base's
fingerprint (loading onto another base is refused), per-tensor encodings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from bnn_adapt.adapters.bitfit import substituted
from bnn_adapt.adapters.file_codec import DTYPES, Writer, choose_codec, decode_tensors
from bnn_adapt.adapters.strategy import make_head_prunable
from bnn_adapt.adapters.udta import ThinBlock
from bnn_adapt.bases.fingerprint import canonical_tensors, fingerprint, sign_weight_names
from bnn_adapt.errors import ConfigError, ExportError, FingerprintError
from bnn_adapt.files import atomic_output
from bnn_adapt.nn.layers import ColumnPrunedLinear

FORMAT = "bnn_adapt.adapter"
VERSION = 1
METADATA_KEY = "bnn_adapt"
ADAPTER_FILE = "adapter.safetensors"  # what an adaptation run writes in its directory
PARTS = ("adapter", "head", "base")  # tensor name prefixes in a file
# --------------------------------------------------------------------------- values


# --------------------------------------------------------------------------- writing


def _dead_channel_output(block: ThinBlock, dead: torch.Tensor) -> torch.Tensor:
    """``ReLU(BN(0))`` of the dead channels, by the very kernel the block's eval forward uses."""
    bn = block.depthwise_norm
    zeros = torch.zeros(1, bn.num_features, 1, 1)
    out = F.batch_norm(zeros, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.relu(out).reshape(-1)[dead]


@torch.no_grad()
def _write_module(writer: Writer, prefix: str, module: nn.Module, dtype: str) -> None:
    """``module``'s state dict under ``prefix``, dead thin-block filters and pruned head columns removed."""
    state = {k: v for k, v in module.state_dict().items() if v.is_floating_point() or v.dtype == torch.bool}
    signs = sign_weight_names(module)

    def codec(key: str) -> str:
        return choose_codec(state[key], key in signs, dtype)

    for name, m in module.named_modules():
        at = f"{name}." if name else ""
        if isinstance(m, ThinBlock):
            dead = (m.depthwise.weight.flatten(1) == 0).all(dim=1)
            if not dead.any():
                continue
            kept, constant = f"{prefix}{at}depthwise.kept", f"{prefix}{at}depthwise_norm.dead_output"
            writer.add(kept, ~dead, "bits", aux=True)
            out = _dead_channel_output(m, dead)
            writer.add(constant, out, choose_codec(out, False, dtype), aux=True)
            key = f"{at}depthwise.weight"
            writer.add(prefix + key, state[key], codec(key), "rows", kept, 0.0)
            del state[key]
            for t, fill in (("weight", 0.0), ("bias", constant), ("running_mean", 0.0), ("running_var", 1.0)):
                key = f"{at}depthwise_norm.{t}"
                writer.add(prefix + key, state[key], codec(key), "rows", kept, fill)
                del state[key]
        elif isinstance(m, ColumnPrunedLinear) and not m.kept_columns.all():
            kept, key = f"{at}kept_columns", f"{at}weight"
            writer.add(prefix + kept, state.pop(kept), "bits")
            # zero the switched-off columns first, so they cannot inflate an int8 scale
            weight = state[key] * m.kept_columns.to(state[key].dtype)
            writer.add(prefix + key, weight, codec(key), "columns", prefix + kept, 0.0)
            del state[key]
    for key in state:
        writer.add(prefix + key, state[key], codec(key))


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
    from bnn_adapt.accounting import summarize  # noqa: PLC0415 - accounting imports nothing of ours back

    if dtype not in DTYPES:
        raise ConfigError(f"export.dtype={dtype!r} is invalid: use one of {', '.join(DTYPES)}")
    reference = model.base if reference_base is None else reference_base
    writer = Writer()
    if model.adapter is not None:
        _write_module(writer, "adapter.", model.adapter, dtype)
    _write_module(writer, "head.", model.head, dtype)
    for name, t in base_differences(model.base, reference).items():
        sign_only = name in sign_weight_names(model.base) and t.abs().eq(1).all()
        writer.add(f"base.{name}", t, choose_codec(t, bool(sign_only), dtype))
    counts = summarize(model)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "strategy": model.strategy,
        "options": model.options,
        "num_classes": model.num_classes,
        "class_names": list(class_names) if class_names else [str(i) for i in range(model.num_classes)],
        "head_columns": any(isinstance(m, ColumnPrunedLinear) for m in model.head.modules()),
        "pruned": bool(model.pruned),
        "base": {"arch": reference.arch, "arch_config": reference.arch_config(), "fingerprint": fingerprint(reference)},
        "dtype": dtype,
        "preprocess": preprocess,
        "counts": {k: counts[k] for k in ("adapter_fp32_params", "adapter_binary_params", "head_fp32_params",
                                           "head_binary_params", "size_pct")},  # fmt: skip
        "source": source or {},
        "tensors": writer.listed(),  # arrays not listed: dense, at their stored shape and dtype
    }
    with atomic_output(path) as tmp:
        save_file(writer.arrays, str(tmp), metadata={METADATA_KEY: json.dumps(meta, separators=(",", ":"))})
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
    return arrays, meta


class AttachedAdapter(nn.Module):
    """An exported adapter rebuilt on a (shared) base; ``forward`` gives logits."""

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


def _load_part(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ExportError(
            f"the {what} in the file does not fit its strategy (missing {missing[:3]}, extra {unexpected[:3]})"
        )


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
    model = STRATEGIES[meta["strategy"]](base, meta["num_classes"], freeze_bn=True, **meta["options"])
    if meta["head_columns"]:
        make_head_prunable(model)
    tensors = decode_tensors(arrays, meta["tensors"])
    parts = {p: {k[len(p) + 1 :]: t for k, t in tensors.items() if k.startswith(p + ".")} for p in PARTS}
    if model.adapter is not None:
        _load_part(model.adapter, parts["adapter"], "adapter")
    _load_part(model.head, parts["head"], "head")
    model.pruned = bool(meta["pruned"])
    model.eval()
    return AttachedAdapter(model, parts["base"], meta, name or Path(path).stem)
