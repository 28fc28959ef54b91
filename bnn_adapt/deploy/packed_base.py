"""The deployable base: every binary weight as one bit, every BatchNorm folded, everything else fp32.

The size metric (docs/concepts.md, Size) charges a base ``n_bin / 8 + 4 * n_fp32`` bytes; this
file format makes that real. Layout (little-endian)::

    8 bytes   magic b"BNNPACK2"
    4 bytes   header length n (uint32)
    n bytes   zlib-compressed JSON header: arch, arch_config, fingerprint, tensor layout
    ...       binary section: the sign bits of every binary weight (1 = +1),
              concatenated in layout order, np.packbits(bitorder="little")
    ...       fp32 section: every other floating tensor, in layout order

A binary layer's forward only reads ``sign(W)`` (BinaryNet) or
``mean|W| * sign(W)`` per output channel (ReActNet), so one bit per weight
(plus, for ReActNet, the per-channel scale as fp32) rebuilds a model whose
outputs are identical to the trained one. Each BatchNorm is stored folded
(:mod:`bnn_adapt.nn.folding`): one scale and one shift per channel, exactly
what the formula charges for its affine parameters, rebuilt as running mean
0, variance 1, ``FOLDED_EPS`` with bit-identical outputs; a norm whose output only
reaches a sign function (``sign_only_norms``) is one threshold per channel
(its directions in the header).

The fingerprint (:func:`~bnn_adapt.bases.fingerprint.fingerprint_of`) hashes the
architecture, the sign bits and every fp32 value: adapters record it and refuse
to attach to any other base (:mod:`bnn_adapt.adapters.file`).

A received file is data to check before anything is built: the header's size
and inflated size are capped, its keys and types are checked, its architecture
is checked (:func:`~bnn_adapt.bases.received.checked_arch`) and its layout
compared with that architecture's, laid out on the meta device, before any
memory is sized by it; the sections must fill the file exactly, fp32 values be
finite and everything hash to the header's fingerprint. Anything else is one
:class:`~bnn_adapt.errors.ExportError` line.
"""

from __future__ import annotations

import json
import mmap
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_adapt.bases import BaseNetwork, rebuild
from bnn_adapt.bases.checkpoint import describe
from bnn_adapt.bases.fingerprint import (
    binary_scale,
    canonical_tensors,
    fingerprint_of,
    pack_sign_bits,
    sign_weight_names,
)
from bnn_adapt.bases.received import checked_arch
from bnn_adapt.deploy.packed_layers import refuse_ternary
from bnn_adapt.errors import ExportError, printable
from bnn_adapt.files import atomic_output, require_finite
from bnn_adapt.nn.folding import BatchNorm, mark_folded
from bnn_adapt.nn.layers import PackedScaledBinaryConv2d, ScaledBinaryConv2d

MAGIC = b"BNNPACK2"
FORMAT = "bnn_adapt.packed_base"
VERSION = 2
#: the most bytes a header may take, compressed or inflated (a ReActNet-18's takes a few kB)
HEADER_LIMIT = 4 << 20
#: the header's keys: the type each holds and its description in an error
HEADER_FIELDS = {
    "format": (str, "a string"),
    "version": (int, "an integer"),
    "arch": (str, "a string"),
    "arch_config": (dict, "an object"),
    "fingerprint": (str, "a string"),
    "binary_bits": (int, "a non-negative integer"),
    "fp32_values": (int, "a non-negative integer"),
    "layout": (list, "a list"),
    "meta": (dict, "an object"),
}
#: layout kinds and the fp32 values each stores per element of its shape
FP32_PER_ELEMENT = {"bits": 0, "fp32": 1, "bnfold": 2, "threshold": 1}


def to_packed_modules(model: nn.Module) -> nn.Module:
    """Swap every ReActNet binary conv for its packed form (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ScaledBinaryConv2d) and not isinstance(module, PackedScaledBinaryConv2d):
            c_out, c_in, k, _ = module.weight.shape
            packed = PackedScaledBinaryConv2d(c_in, c_out, k, module.stride, module.padding)
            with torch.no_grad():
                packed.weight.copy_(module.weight)
                packed.scale.copy_(binary_scale(module))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, packed)
    return model


def _layout(tensors: list[tuple[str, str, torch.Tensor]], model: nn.Module) -> tuple[list[list], list[torch.Tensor]]:
    """``[name, kind, shape]`` entries and the fp32 values in their order: a folded BatchNorm's pair is one
    ``bnfold`` entry (scale, then shift), a sign-only norm's one ``threshold`` entry (its thresholds; the
    directions, +-1 per channel, as a string of ``+`` and ``-`` in the entry)."""
    norms = {n for n, m in model.named_modules() if isinstance(m, BatchNorm)}
    sign_only = set(getattr(model, "sign_only_norms", ()))
    layout, values, i = [], [], 0
    while i < len(tensors):
        name, kind, t = tensors[i]
        owner = name.rpartition(".")[0]
        if owner in norms and name == f"{owner}.weight":
            bias = tensors[i + 1][2]
            if owner in sign_only:  # weight = direction, bias = -direction * threshold
                layout.append([owner, "threshold", list(t.shape), "".join("+" if d > 0 else "-" for d in t.tolist())])
                values.append(-t * bias)
            else:
                layout.append([owner, "bnfold", list(t.shape)])
                values += [t, bias]
            i += 2
            continue
        layout.append([name, kind, list(t.shape)])
        if kind == "fp32":
            values.append(t)
        i += 1
    return layout, values


def pack_base(base: BaseNetwork, meta: dict | None = None) -> tuple[bytes, dict]:
    """The packed file's bytes and its header."""
    refuse_ternary(base)
    tensors = canonical_tensors(base)
    binary = pack_sign_bits([t for _, kind, t in tensors if kind == "bits"])
    layout, fp32 = _layout(tensors, base)
    values = torch.cat([t.reshape(-1) for t in fp32]).numpy().astype("<f4") if fp32 else np.zeros(0, "<f4")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "arch": base.arch,
        "arch_config": base.arch_config(),
        "fingerprint": fingerprint_of(base.arch, base.arch_config(), tensors),
        "binary_bits": int(sum(t.numel() for _, kind, t in tensors if kind == "bits")),
        "fp32_values": int(values.size),
        "layout": layout,
        "meta": meta or {},
    }
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(head)) + head + binary + values.tobytes(), header


def write_packed_base(base: BaseNetwork, path: str | Path, meta: dict | None = None) -> dict:
    """Write ``base`` bit-packed to ``path``; returns the header."""
    data, header = pack_base(base, meta)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return header


def expected_layout(arch: str, arch_config: dict) -> list[list]:
    """The ``[name, kind, shape]`` entries :func:`pack_base` writes for ``arch`` (a threshold's directions left
    out), from the network laid out on the meta device: a received layout is checked without allocating it."""
    with torch.device("meta"):
        model = to_packed_modules(rebuild(arch, arch_config))
    signs = sign_weight_names(model)
    norms = {n for n, m in model.named_modules() if isinstance(m, BatchNorm)}
    sign_only = set(getattr(model, "sign_only_norms", ()))
    layout = []
    for key, t in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if not t.is_floating_point() or (owner in norms and attr != "weight"):
            continue
        if owner in norms:
            layout.append([owner, "threshold" if owner in sign_only else "bnfold", list(t.shape)])
        else:
            layout.append([key, "bits" if key in signs else "fp32", list(t.shape)])
    return layout


def _read_header(data: bytes | mmap.mmap, problem: str) -> tuple[object, int]:
    """The header as JSON (unchecked) and where the binary section starts; its declared length is checked
    against the file and :data:`HEADER_LIMIT`, and inflating it stops at that limit."""
    if len(data) == 0:
        raise ExportError(f"{problem} (the file is empty)")
    start = len(MAGIC) + 4
    if len(data) < start and MAGIC.startswith(bytes(data[: len(MAGIC)])):
        raise ExportError(f"{problem} (truncated: {len(data)} bytes, the header's length alone needs {start})")
    if data[: len(MAGIC)] != MAGIC:
        raise ExportError(f"{problem} (it starts with {printable(repr(bytes(data[: len(MAGIC)])))}, not {MAGIC!r})")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    if n > HEADER_LIMIT:
        raise ExportError(f"{problem} (it declares a header of {n} bytes; a base's takes at most {HEADER_LIMIT})")
    if start + n > len(data):
        raise ExportError(f"{problem} (truncated: {len(data)} bytes, its header alone needs {start + n})")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data[start : start + n], HEADER_LIMIT)
        if inflater.unconsumed_tail:
            raise ExportError(f"{problem} (its header inflates to more than {HEADER_LIMIT} bytes)")
        if not inflater.eof or inflater.unused_data:
            raise ExportError(f"{problem} (its header is not one whole zlib stream)")
        return json.loads(text), start + n
    except (ValueError, RecursionError, zlib.error) as exc:
        raise ExportError(f"{problem} (unreadable header: {printable(exc)[:200]})") from None


def _check_fields(header: object, problem: str) -> None:
    """Refuse a header without exactly the keys :func:`pack_base` writes, each of its type."""
    if not isinstance(header, dict):
        raise ExportError(f"{problem} (its header is a JSON {type(header).__name__}, not an object)")
    missing = [key for key in HEADER_FIELDS if key not in header]
    if missing:
        raise ExportError(f"{problem} (its header has no {missing[0]!r})")
    unknown = sorted(map(str, set(header) - set(HEADER_FIELDS)))
    if unknown:
        raise ExportError(f"{problem} (its header has the unknown key {printable(repr(unknown[0]))[:80]})")
    for key, (kind, word) in HEADER_FIELDS.items():
        value = header[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ExportError(f"{problem} (its header's {key} is {printable(repr(value))[:80]}, not {word})")
    found = f"{printable(repr(header['format']))[:80]} version {header['version']}"
    if (header["format"], header["version"]) != (FORMAT, VERSION):
        raise ExportError(f"{problem} (format {found}, not {FORMAT!r} version {VERSION})")


def _entry_problem(entry: object, count: int | None) -> str | None:
    """What is wrong with a layout entry's form (None: nothing); ``count``: its elements, once its shape is known."""
    if not isinstance(entry, list) or len(entry) not in (3, 4) or not isinstance(entry[0], str):
        return "not [name, kind, shape]"
    if not isinstance(entry[1], str) or entry[1] not in FP32_PER_ELEMENT:
        return f"not of a kind {', '.join(FP32_PER_ELEMENT)}"
    shape = entry[2]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return "without a shape of non-negative integers"
    if count is None:
        return None
    directions = entry[3] if len(entry) == 4 else None
    if entry[1] != "threshold":
        return None if directions is None else "not a threshold, yet with directions"
    if not isinstance(directions, str) or len(directions) != count or directions.strip("+-"):
        return f"a threshold without its {count} directions, each '+' or '-'"
    return None


def _check_layout(header: dict, config: dict, problem: str) -> None:
    """Refuse a layout other than the one :func:`pack_base` writes for the header's architecture (laid out on
    the meta device, nothing allocated), and section sizes other than that layout's."""
    expected, layout = expected_layout(header["arch"], config), header["layout"]
    misfit = f"{problem}: its layout does not fit a {describe(header['arch'], config)}"
    counts = dict.fromkeys(FP32_PER_ELEMENT, 0)
    for i, entry in enumerate(layout):
        wrong = _entry_problem(entry, None)
        if wrong is None and (i >= len(expected) or entry[:3] != expected[i]):
            wanted = expected[i] if i < len(expected) else "no further entry"
            raise ExportError(f"{misfit} (entry {i} is {printable(entry[:3])[:120]}, expected {wanted})")
        count = None if wrong else int(np.prod(entry[2]))
        wrong = wrong or _entry_problem(entry, count)
        if wrong:
            raise ExportError(f"{problem} (its layout entry {i}, {printable(repr(entry))[:120]}, is {wrong})")
        counts[entry[1]] += count
    if len(layout) < len(expected):
        raise ExportError(f"{misfit} (it ends after {len(layout)} entries, before {expected[len(layout)]})")
    n_values = sum(counts[kind] * per for kind, per in FP32_PER_ELEMENT.items())
    declared = f"{header['binary_bits']} bits and {header['fp32_values']} fp32 values"
    if (header["binary_bits"], header["fp32_values"]) != (counts["bits"], n_values):
        raise ExportError(f"{problem} (its header declares {declared}, its layout {counts['bits']} and {n_values})")


def _check_values(header: dict, values: torch.Tensor, source: str) -> None:
    """Refuse NaN and infinities among the fp32 values, naming the tensor: they would binarise or
    predict as if they were numbers."""
    v = 0
    for name, kind, shape, *_ in header["layout"]:
        n = FP32_PER_ELEMENT[kind] * int(np.prod(shape))
        found, v = values[v : v + n], v + n
        if kind == "threshold":  # a channel whose sign never changes has an infinite threshold (sign_threshold)
            found = torch.where(found.isinf(), 0.0, found)
        require_finite({name: found}, f"packed base {source}", error=ExportError)


def file_tensors(header: dict, binary: bytes, values: torch.Tensor) -> list[tuple[str, str, torch.Tensor]]:
    """What a checked file stores as :func:`~bnn_adapt.bases.fingerprint.canonical_tensors` lists it (the
    layout's order, a norm as its weight and bias): what its fingerprint hashes."""
    bits = np.unpackbits(np.frombuffer(binary, np.uint8), count=header["binary_bits"], bitorder="little")
    bits, b, tensors = torch.from_numpy(bits.astype(bool)), 0, []
    state, _, _ = decode_layout(header, values)
    for name, kind, shape, *_ in header["layout"]:
        if kind == "bits":
            count = int(np.prod(shape))
            tensors.append((name, "bits", bits[b : b + count].reshape(shape)))
            b += count
        elif kind == "fp32":
            tensors.append((name, "fp32", state[name]))
        else:
            tensors += [(f"{name}.{t}", "fp32", state[f"{name}.{t}"]) for t in ("weight", "bias")]
    return tensors


def parse_packed(data: bytes | mmap.mmap, source: str = "<bytes>") -> tuple[dict, bytes, torch.Tensor]:
    """A packed file's checked parts (``data``: its bytes or a map of them): header, binary section (sign
    bits) and fp32 values. Only what the checked header declares is read."""
    problem = f"{source} is not a packed base written by task=export"
    header, bin_start = _read_header(data, problem)
    _check_fields(header, problem)
    config = checked_arch(header["arch"], header["arch_config"], f"packed base {source}", error=ExportError)
    _check_layout(header, config, problem)
    n_bits, n_values = header["binary_bits"], header["fp32_values"]
    bin_end = bin_start + (n_bits + 7) // 8
    if len(data) != bin_end + 4 * n_values:
        what = "truncated" if len(data) < bin_end + 4 * n_values else "trailing bytes"
        raise ExportError(f"{problem} ({what}: {len(data)} bytes, its header declares {bin_end + 4 * n_values})")
    binary = bytes(data[bin_start:bin_end])
    values = torch.from_numpy(np.frombuffer(data, "<f4", count=n_values, offset=bin_end).copy())
    _check_values(header, values, source)
    tensors = file_tensors(header, binary, values)
    if fingerprint_of(header["arch"], header["arch_config"], tensors) != header["fingerprint"]:
        wrong = "its architecture or weights do not match its fingerprint (the file is corrupt or was edited)"
        raise ExportError(f"{problem}: {wrong}; export the base again with task=export")
    return header, binary, values


def read_packed(path: str | Path) -> tuple[dict, bytes, torch.Tensor]:
    """A packed base file's checked parts (:func:`parse_packed`). The file is mapped, not read whole:
    a file of any size costs only the parts its checked header declares."""
    path = Path(path)
    try:
        if not path.exists():
            raise ExportError(f"packed base {path} does not exist; write one with task=export base.checkpoint=...")
        if not path.is_file():
            raise ExportError(f"packed base {path} is not a file; pass the base.bnnpack file task=export wrote")
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                return parse_packed(b"", str(path))
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return parse_packed(data, str(path))
    except OSError as exc:
        raise ExportError(f"packed base {path} is unreadable ({printable(exc.strerror or exc)})") from None


def decode_layout(header: dict, values: torch.Tensor) -> tuple[dict, list[tuple[str, list[int], int]], list[str]]:
    """A checked file's layout decoded: ``(float state, [(weight name, shape, first bit)], folded norms)``.

    Float state holds every fp32 tensor, BatchNorms rebuilt from their folded scale and shift (or
    threshold) as running mean 0, variance 1; the folded norms need ``FOLDED_EPS``
    (:func:`~bnn_adapt.nn.folding.mark_folded`) to compute the same."""
    state, binary, folded, b, v = {}, [], [], 0, 0
    for entry in header["layout"]:
        name, kind, shape = entry[:3]
        count = int(np.prod(shape))
        if kind == "bits":
            binary.append((name, shape, b))
            b += count
            continue
        n_tensors = FP32_PER_ELEMENT[kind]
        found = values[v : v + n_tensors * count].reshape(n_tensors, *shape)
        v += n_tensors * count
        if kind == "fp32":
            state[name] = found[0]
            continue
        if kind == "threshold":
            direction = torch.tensor([1.0 if c == "+" else -1.0 for c in entry[3]])
            found = torch.stack([direction, -direction * found[0]])
        state.update({f"{name}.weight": found[0], f"{name}.bias": found[1]})
        state.update({f"{name}.running_mean": torch.zeros(shape), f"{name}.running_var": torch.ones(shape)})
        folded.append(name)
    return state, binary, folded


def build_base(header: dict, binary: bytes, values: torch.Tensor) -> BaseNetwork:
    """The base (in eval mode, packed modules, BatchNorms folded) of a checked file's parts."""
    bits = np.unpackbits(np.frombuffer(binary, np.uint8), count=header["binary_bits"], bitorder="little")
    bits = torch.from_numpy(bits.astype(bool))
    base = to_packed_modules(rebuild(header["arch"], header["arch_config"]))
    state, binary_entries, folded = decode_layout(header, values)
    for name, shape, first in binary_entries:
        state[name] = torch.where(bits[first : first + int(np.prod(shape))], 1.0, -1.0).reshape(shape)
    for name in folded:
        mark_folded(base.get_submodule(name))
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return base.eval()


def unpack_base(data: bytes, source: str = "<bytes>") -> tuple[BaseNetwork, dict]:
    """Rebuild the base (in eval mode, packed modules, BatchNorms folded) from a packed file's bytes."""
    header, binary, values = parse_packed(data, source)
    return build_base(header, binary, values), header


def read_packed_base(path: str | Path) -> tuple[BaseNetwork, dict]:
    """Load a packed base file: ``(base in eval mode, header)``."""
    header, binary, values = read_packed(path)
    return build_base(header, binary, values), header


def repack(base: BaseNetwork) -> tuple[BaseNetwork, dict]:
    """``base`` as a packed file would rebuild it (in memory, no file)."""
    return unpack_base(pack_base(base)[0])
