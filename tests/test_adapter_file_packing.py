"""Adapter files compress their value streams losslessly (format 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnn_adapt.adapters.file import VERSION, attach_adapter, export_adapter, read_adapter_file
from bnn_adapt.adapters.file_codec import compress_streams, decompress_streams
from bnn_adapt.errors import ExportError
from tests.helpers.files import rewrite, stored
from tests.helpers.models import adapted, make_base


def test_streams_come_back_byte_for_byte_and_only_what_shrinks_is_compressed():
    gen = np.random.default_rng(0)
    weights = (gen.standard_normal(5000) * 0.05).astype(np.float32)  # sign/exponent bytes repeat: compresses
    noise = gen.integers(0, 256, 3000, dtype=np.uint8)  # incompressible: stays a plain array
    arrays = {"f32": weights, "f16": weights[:777].astype(np.float16), "u8": noise, "i8": np.zeros(0, np.int8)}
    packed, packing = compress_streams(arrays)
    assert packing == {"f32": "lzma", "f16": "lzma"}
    assert packed["f32"].nbytes < 0.9 * weights.nbytes and packed["u8"] is noise
    back = decompress_streams(packed, packing, limit=sum(a.nbytes for a in arrays.values()))
    for name, values in arrays.items():
        assert back[name].dtype == values.dtype and back[name].tobytes() == values.tobytes()


@pytest.mark.parametrize(
    ("strategy", "variant", "bits"),
    [("udta", "pruned", None), ("serial", "plain", 4), ("udta", "pruned", 1), ("bitfit", "bn_drift", None)],
)
def test_a_compressed_file_loads_what_its_plain_streams_held(strategy, variant, bits, tmp_path):
    base, size = make_base("ste")
    model = adapted(strategy, base, variant, bits=bits, jitter=0.05)
    path = tmp_path / "a.safetensors"
    export_adapter(model, path, reference_base=base)
    arrays, meta = stored(path)
    assert meta["version"] == VERSION == 3 and meta["packing"]  # something compressed
    plain, _ = read_adapter_file(path)
    assert sum(a.nbytes for a in arrays.values()) < sum(a.nbytes for a in plain.values())
    # the same file with its streams stored plain (no packing) loads to the same model
    rewrite(tmp_path / "plain.safetensors", plain, meta | {"packing": {}})
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(attach_adapter(path, base)(x), expected)
        assert torch.equal(attach_adapter(tmp_path / "plain.safetensors", base)(x), expected)


def test_a_damaged_stream_is_one_error_naming_the_fix(tmp_path):
    base, _ = make_base("ste")
    path = tmp_path / "a.safetensors"
    export_adapter(adapted("udta", base, "pruned", jitter=0.05), path, reference_base=base)
    arrays, meta = stored(path)
    name = next(iter(meta["packing"]))
    arrays[name] = arrays[name].copy()
    arrays[name][len(arrays[name]) // 2 :] = 0
    rewrite(path, arrays, meta)
    with pytest.raises(ExportError, match=rf"cannot be read: stream '{name}' is damaged.*export the adapter again"):
        attach_adapter(path, base)


def test_a_file_from_a_newer_format_is_refused_with_the_fix(tmp_path):
    base, _ = make_base("ste")
    path = tmp_path / "a.safetensors"
    export_adapter(adapted("serial", base), path, reference_base=base)
    arrays, meta = stored(path)
    rewrite(path, arrays, meta | {"version": VERSION + 1})
    with pytest.raises(
        ExportError, match=r"format version 4, newer than this bnn_adapt reads \(3\); upgrade bnn_adapt"
    ):
        attach_adapter(path, base)


def test_class_names_are_stored_only_when_they_are_not_the_indices(tmp_path):
    base, _ = make_base("ste")
    model = adapted("serial", base)
    export_adapter(model, tmp_path / "plain.safetensors", reference_base=base)
    export_adapter(model, tmp_path / "named.safetensors", reference_base=base, class_names=["cat", "dog", "ant", "bee"])
    assert stored(tmp_path / "plain.safetensors")[1]["class_names"] is None
    assert attach_adapter(tmp_path / "plain.safetensors", base).class_names == ["0", "1", "2", "3"]
    assert attach_adapter(tmp_path / "named.safetensors", base).class_names == ["cat", "dog", "ant", "bee"]
