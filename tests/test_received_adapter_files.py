"""Adapter files from others: every crafted one is refused with one line naming the file and what is wrong,
before it can allocate more than its model needs; nothing in it builds a huge model or yields NaN."""

from __future__ import annotations

import copy
import dataclasses
import lzma
import tracemalloc

import numpy as np
import pytest

from bnn_adapt.adapters import STRATEGIES
from bnn_adapt.adapters.file import attach_adapter, export_adapter, read_adapter_file
from bnn_adapt.errors import ExportError
from tests.helpers.files import rewrite, stored
from tests.helpers.models import adapted, make_base


@pytest.fixture(scope="module")
def base():
    return make_base("ste")[0]


def exported(base, tmp_path, strategy: str = "udta", variant: str = "pruned"):
    """A real adapter file (a pruned UDTA's has rows, columns and gaps records) and its arrays and metadata."""
    path = tmp_path / "adapter.safetensors"
    preprocess = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    export_adapter(adapted(strategy, base, variant, jitter=0.05), path, reference_base=base, preprocess=preprocess)
    return path, *stored(path)


def refused(path, base, match: str) -> str:
    """The one-line error attaching ``path`` gives, which names the file."""
    with pytest.raises(ExportError, match=match) as err:
        attach_adapter(path, base)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


def test_every_strategy_declares_the_options_its_files_record(base):
    """An adapter file's options are checked against the strategy's ``options_class``: it must be the class
    of what the strategy records, or a file of it could never be read back."""
    for name, cls in STRATEGIES.items():
        recorded = set(cls(copy.deepcopy(base), 4).options)
        declared = {f.name for f in dataclasses.fields(cls.options_class)} if cls.options_class else set()
        assert recorded == declared, name


def test_a_stream_that_inflates_past_what_its_records_need_stops_there(base, tmp_path):
    """A 256 MB stream of zeros packed into a few kB: decompression stops at the most bytes the declared model's
    records can need, before any large allocation."""
    path, arrays, meta = exported(base, tmp_path)
    packer = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])
    bomb = b"".join([packer.compress(bytes(1 << 20)) for _ in range(256)] + [packer.flush()])
    assert len(bomb) < 100_000
    name = next(iter(meta["packing"]))
    rewrite(path, arrays | {name: np.frombuffer(bomb, dtype=np.uint8)}, meta)
    tracemalloc.start()
    try:
        refused(path, base, rf"stream '{name}' inflates past the \d+ bytes the adapter's records can need")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, peak


def _set(key, value):
    return lambda meta: meta | {key: value}


def _drop(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _options(**values):
    return lambda meta: meta | {"options": meta["options"] | values}


def _preprocess(**values):
    return lambda meta: meta | {"preprocess": meta["preprocess"] | values}


CRAFTED = {
    "a list": (lambda meta: [meta], r"metadata is a JSON list, not an object"),
    "no base": (_drop("base"), r"its metadata lacks base"),
    "an unknown key": (_set("records", {}), r"unknown metadata 'records'"),
    "an older version": (_set("version", 2), r"format version 2, which this bnn_adapt does not read \(it reads 3\)"),
    "a version string": (_set("version", "3"), r"format version '3', which this bnn_adapt does not read"),
    "a billion classes": (_set("num_classes", 10**9), r"num_classes=1000000000 is outside 2..100000"),
    "negative classes": (_set("num_classes", -3), r"num_classes=-3 is outside 2..100000"),
    "classes as text": (_set("num_classes", "4"), r"num_classes='4' is of the wrong type"),
    "fewer class names": (_set("class_names", ["cat", "dog"]), r"class_names are not 4 strings"),
    "an unknown option": (_options(rank=4), r"unknown option 'rank' for udta"),
    "a missing option": (lambda m: m | {"options": {"head": "concat", "bits": 32}}, r"no option groups for udta"),
    "an option of another type": (_options(bits=[4]), r"options.bits=\[4\] is not int"),
    "an option the base refuses": (_options(groups=7), r"udta options do not fit its base"),
    "a huge image size": (_preprocess(image_size=50000), r"image_size=50000 is not an integer within 8..1024"),
    "a zero std": (_preprocess(std=[0.5, 0.0, 0.5]), r"preprocess.std=.* is not 3 finite numbers > 0"),
    "two means": (_preprocess(mean=[0.5, 0.5]), r"preprocess.mean=.* is not 3 finite numbers"),
    "an unknown dtype": (_set("dtype", "fp64"), r"dtype='fp64' is none of fp32, fp16, int8"),
    "an unknown architecture": (
        lambda m: m | {"base": m["base"] | {"arch": "vgg"}},
        r"its base declares the architecture 'vgg'",
    ),
    "a base tensor it lacks": (_set("base_tensors", ["nowhere.weight"]), r"base_tensors names 'nowhere.weight'"),
    "an unknown encoding": (_set("encodings", {"head.0.weight": {"enc": "rle"}}), r"encodings.'head.0.weight'="),
    "an encoding of no tensor": (
        lambda m: m | {"encodings": m["encodings"] | {"adapter.x": {}}},
        r"encodings name 'adapter.x', which is no tensor",
    ),
    "another codec": (
        lambda m: m | {"encodings": m["encodings"] | {"head.0.bias": {"codec": "q4"}}},
        r"tensor head.0.bias is stored as 'q4', not f32",
    ),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_metadata_is_one_line_naming_the_file_and_the_key(case, base, tmp_path):
    path, arrays, meta = exported(base, tmp_path)
    edit, match = CRAFTED[case]
    rewrite(path, arrays, edit(meta))
    refused(path, base, match)


def test_options_that_would_build_a_huge_adapter_are_refused_before_building(base, tmp_path):
    """A LoRA rank far beyond the base's channels would allocate gigabytes of branches."""
    path, arrays, meta = exported(base, tmp_path, "lora", "plain")
    rewrite(path, arrays, meta | {"options": meta["options"] | {"rank": 10**6}})
    refused(path, base, r"lora options build an adapter of [\d,]+ parameters, more than 16 times its base's")


def plain(path):
    """The file's streams decompressed and its metadata as stored, to be written back with plain streams."""
    streams, _ = read_adapter_file(path)
    return streams, stored(path)[1] | {"packing": {}}


@pytest.mark.parametrize(
    ("cut", "match"),
    [(-1, r"cannot be read: the file's f32 array ends early"), (3, r"its f32 stream holds 3 values beyond")],
)
def test_a_stream_shorter_or_longer_than_its_records_is_refused(cut, match, base, tmp_path):
    path, _, _ = exported(base, tmp_path)
    streams, meta = plain(path)
    f32 = streams["f32"][:cut] if cut < 0 else np.concatenate([streams["f32"], np.ones(cut, np.float32)])
    rewrite(path, streams | {"f32": f32}, meta)
    refused(path, base, match)


@pytest.mark.parametrize("extra", [10**6, 40])
def test_more_nonzeros_than_a_gaps_record_holds_are_refused(extra, base, tmp_path):
    """More non-zeros than the tensor has values, or than its gap bytes hold (the next records' bytes then
    read as gaps, and some stream ends early or points outside a tensor)."""
    path, _, _ = exported(base, tmp_path)
    streams, meta = plain(path)
    name = next(n for n, e in meta["encodings"].items() if e.get("enc") == "gaps")
    entry = meta["encodings"][name] | {"nnz": meta["encodings"][name]["nnz"] + extra}
    rewrite(path, streams, meta | {"encodings": meta["encodings"] | {name: entry}})
    refused(path, base, r"non-zeros in \d+ values" if extra == 10**6 else r"cannot be read: .*(ends early|outside)")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_is_refused_naming_the_tensor(value, base, tmp_path):
    path, _, _ = exported(base, tmp_path, "serial", "plain")
    streams, meta = plain(path)
    f32 = streams["f32"].copy()
    f32[-1] = value  # the head's last bias
    rewrite(path, streams | {"f32": f32}, meta)
    refused(path, base, r"tensor head\.\S+ holds NaN or infinite values")


def test_class_names_stay_as_the_file_holds_them_up_to_255_characters(base, tmp_path):
    """The printing side escapes them; a longer name is refused."""
    path, arrays, meta = exported(base, tmp_path)
    names = ["\x1b]0;owned\x07cat", "dog\nfake: line", "a" * 255, ""]
    rewrite(path, arrays, meta | {"class_names": names})
    assert attach_adapter(path, base).class_names == names
    rewrite(path, arrays, meta | {"class_names": [*names[:2], "a" * 256, ""]})
    refused(path, base, r"class_names are not 4 strings of at most 255 characters")
