"""Fuzzing the files one receives: adapter files, packed bases and base checkpoints, mutated.

Each valid file is truncated, has bytes flipped or its header or metadata edited (values replaced by
random JSON, keys dropped, tensors reshaped). Whatever the mutation, reading it either succeeds or
stops with bnn_adapt's one-line :class:`~bnn_adapt.errors.UserError`: never another exception, and
never more memory than the cap (an address-space limit a few GiB above what the process holds).
The examples are derandomised and bounded, so the tests are repeatable and run in the fast tier.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

from bnn_adapt.adapters.file import METADATA_KEY, attach_adapter, export_adapter
from bnn_adapt.bases.checkpoint import load_base, save_base
from bnn_adapt.deploy.packed_base import MAGIC, pack_base, read_packed_base
from bnn_adapt.errors import UserError
from tests.helpers.models import adapted, make_base

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CAP_BYTES = 3 << 30  # address space the reader may add on top of what the process maps already

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6,
)


@contextlib.contextmanager
def memory_cap(extra: int = CAP_BYTES):
    """An address-space limit ``extra`` bytes above the process's current size, lifted afterwards."""
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def read_or_refuse(read) -> str:
    """``"read"``, or ``"refused"`` with a one-line UserError; any other exception fails the test."""
    try:
        with memory_cap():
            read()
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\x1b" not in message, message
        return "refused"
    return "read"


def fuzz(files, path: Path, read) -> None:
    """Each mutated file of ``files`` (a strategy of bytes) written to ``path`` and read with ``read(path)``:
    read or refused in one line, and at least one refused (the mutations reach the checks)."""
    outcomes = []

    @FUZZ
    @given(data=files)
    def check(data):
        path.write_bytes(data)
        outcomes.append(read_or_refuse(lambda: read(path)))

    check()
    assert "refused" in outcomes


def edit_json(draw, document):
    """``document`` with one value somewhere replaced by random JSON, or one key dropped."""
    document = copy.deepcopy(document)
    node = document
    for _ in range(draw(st.integers(0, 3))):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        containers = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
        if not containers:
            break
        node = draw(st.sampled_from(containers))[1]
    keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
    if not keys:
        return draw(JSON_VALUES)
    key = draw(st.sampled_from(keys))
    if isinstance(node, dict) and draw(st.booleans()):
        del node[key]
    else:
        node[key] = draw(JSON_VALUES)
    return document


def damaged_bytes(draw, data: bytes) -> bytes:
    """``data`` truncated or with a few bytes replaced."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


# ----------------------------------------------------------------------------- adapter files


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """A pruned UDTA adapter file (rows, columns and sparse records) on a tiny STE base."""
    base = make_base("ste")[0]
    path = tmp_path_factory.mktemp("fuzz") / "adapter.safetensors"
    preprocess = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    export_adapter(adapted("udta", base, "pruned", jitter=0.05), path, reference_base=base, preprocess=preprocess)
    with safe_open(str(path), framework="np") as f:
        arrays, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[METADATA_KEY])
    return base, path.read_bytes(), arrays, meta


@st.composite
def adapter_mutations(draw, adapter_file):
    _, data, arrays, meta = adapter_file
    kind = draw(st.sampled_from(["bytes", "metadata", "arrays"]))
    if kind == "bytes":
        return damaged_bytes(draw, data)
    if kind == "metadata":
        return save(dict(arrays), metadata={METADATA_KEY: json.dumps(edit_json(draw, meta))})
    arrays = dict(arrays)
    name = draw(st.sampled_from(sorted(arrays)))
    raw = bytearray(arrays[name].tobytes())
    if raw and draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(draw(st.integers(1, 8))):
            if raw:
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    usable = len(raw) - len(raw) % arrays[name].itemsize
    arrays[name] = np.frombuffer(bytes(raw[:usable]), dtype=arrays[name].dtype).copy()
    return save(arrays, metadata={METADATA_KEY: json.dumps(meta)})


def test_mutated_adapter_files_are_read_or_refused_in_one_line(adapter_file, tmp_path):
    base = adapter_file[0]
    fuzz(adapter_mutations(adapter_file), tmp_path / "received.safetensors", lambda path: attach_adapter(path, base))


# ----------------------------------------------------------------------------- packed bases


@pytest.fixture(scope="module")
def packed_file():
    data, header = pack_base(make_base("ste")[0])
    return data, header


def with_header(data: bytes, header: dict) -> bytes:
    """``data`` with its header replaced by ``header`` (compressed, its length field updated)."""
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    body = data[len(MAGIC) + 4 + n :]
    head = zlib.compress(json.dumps(header).encode(), 9)
    return MAGIC + struct.pack("<I", len(head)) + head + body


@st.composite
def packed_mutations(draw, packed_file):
    data, header = packed_file
    if draw(st.booleans()):
        return damaged_bytes(draw, data)
    return with_header(data, edit_json(draw, header))


def test_mutated_packed_bases_are_read_or_refused_in_one_line(packed_file, tmp_path):
    fuzz(packed_mutations(packed_file), tmp_path / "received.bnnpack", read_packed_base)


# ----------------------------------------------------------------------------- base checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny STE base checkpoint as pretraining writes it, and its payload."""
    base = make_base("ste")[0]
    path = tmp_path_factory.mktemp("fuzz") / "base.pt"
    save_base(base, path, image_size=32, top1=0.5, epoch=3)
    return path.read_bytes(), torch.load(path, weights_only=True)


@st.composite
def checkpoint_mutations(draw, checkpoint):
    data, payload = checkpoint
    kind = draw(st.sampled_from(["bytes", "fields", "tensors"]))
    if kind == "bytes":
        return damaged_bytes(draw, data)
    payload = {**payload, "state_dict": dict(payload["state_dict"])}
    if kind == "fields":
        plain = {k: v for k, v in payload.items() if k != "state_dict"}
        payload = {**edit_json(draw, plain), "state_dict": payload["state_dict"]}
    else:
        state = payload["state_dict"]
        name = draw(st.sampled_from(sorted(state)))
        action = draw(st.sampled_from(["drop", "reshape", "rename", "non-finite"]))
        if action == "drop":
            del state[name]
        elif action == "reshape":
            state[name] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=4)))
        elif action == "rename":
            state[draw(st.text(max_size=12))] = state.pop(name)
        elif state[name].is_floating_point() and state[name].numel():
            state[name] = state[name].clone()
            state[name].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def test_mutated_base_checkpoints_are_read_or_refused_in_one_line(checkpoint, tmp_path):
    read = lambda path: load_base("ste_resnet_cifar", path, "pretrain one")  # noqa: E731
    fuzz(checkpoint_mutations(checkpoint), tmp_path / "received.pt", read)
