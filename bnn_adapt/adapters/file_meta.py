"""The metadata of an adapter file (a JSON block under :data:`METADATA_KEY`), checked before it is trusted.

A file may come from anyone: every key must be there with its type, the strategy's options must be exactly
its ``options_class``'s fields, and the declared sizes (classes, class names, image size) must be within
what any adapter needs, before anything is built or decompressed from it (:mod:`bnn_adapt.adapters.file`).
Any fault is one :class:`~bnn_adapt.errors.ExportError` line naming the file and the key.
"""

from __future__ import annotations

import json
import math
import types
import typing
from pathlib import Path

from bnn_adapt.adapters.file_codec import DTYPES, ENCODINGS
from bnn_adapt.adapters.strategy import STRATEGIES
from bnn_adapt.errors import ExportError, printable

FORMAT = "bnn_adapt.adapter"
VERSION = 3  # the only one this version reads
METADATA_KEY = "bnn_adapt"


#: what a received file may declare: no adapter anyone trains has more classes or larger images, no class name
#: (an ImageFolder's folder name) is longer than a file name can be; options that build an adapter larger than
#: ``ADAPTER_SCALE`` times its base are refused before building
NUM_CLASSES, NAME_CHARS, IMAGE_SIZES, ADAPTER_SCALE = (2, 100_000), 255, (8, 1024), 16
#: the metadata of an adapter file: every key, with the type of its value
KEYS = {
    "format": str,
    "version": int,
    "strategy": str,
    "options": dict,
    "num_classes": int,
    "class_names": (list, type(None)),
    "head_columns": bool,
    "pruned": bool,
    "base": dict,
    "dtype": str,
    "preprocess": (dict, type(None)),
    "source": dict,
    "layout": str,
    "base_tensors": list,
    "encodings": dict,
    "packing": dict,
}
FIX = "the file is damaged or was not written by task=export: export the adapter again"


def refused(path: Path, what: str) -> ExportError:
    return ExportError(f"adapter file {path}: {what}; {FIX}")


def shown(value: object) -> str:
    """A value read from a file, escaped and cut short for a message."""
    return printable(repr(value))[:80]


def _is(value: object, kind) -> bool:
    """``isinstance`` where a bool is no number (JSON tells them apart) and a float is finite."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) and not (isinstance(value, float) and not math.isfinite(value))


def _fits(value: object, hint) -> bool:
    """Whether a JSON value is a plain value of an options field's type (``int``, ``float``, ``str``,
    ``list[int]`` and unions of them), or null (as a config may give: the strategy checks it)."""
    if value is None:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and len(value) <= 64 and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    return _is(value, (int, float) if hint is float else hint)


def _check_options(meta: dict, path: Path) -> None:
    """The strategy is known and its options are exactly its options dataclass's fields, of their types."""
    strategy, options = meta["strategy"], meta["options"]
    if strategy not in STRATEGIES:
        raise refused(path, f"strategy {shown(strategy)} is unknown to this version (known: {', '.join(STRATEGIES)})")
    options_class = STRATEGIES[strategy].options_class
    fields = typing.get_type_hints(options_class) if options_class else {}
    unknown, missing = sorted(set(options) - set(fields)), sorted(set(fields) - set(options))
    if unknown or missing:
        what = f"unknown option {shown(unknown[0])}" if unknown else f"no option {missing[0]}"
        raise refused(path, f"options: {what} for {strategy}, whose options are {', '.join(fields) or 'none'}")
    for key, value in options.items():
        if not _fits(value, fields[key]):
            kind = fields[key].__name__ if isinstance(fields[key], type) else str(fields[key])
            raise refused(path, f"options.{key}={shown(value)} is not {kind}")


def _check_preprocess(preprocess: dict | None, path: Path) -> None:
    """None, or the image size (within :data:`IMAGE_SIZES`), 3 means and 3 positive stds of the run's eval."""
    if preprocess is None:
        return
    if set(preprocess) != {"image_size", "mean", "std"}:
        raise refused(path, f"preprocess holds {shown(sorted(preprocess))}, not image_size, mean and std")
    size, (low, high) = preprocess["image_size"], IMAGE_SIZES
    if not _is(size, int) or not low <= size <= high:
        raise refused(path, f"preprocess.image_size={shown(size)} is not an integer within {low}..{high}")
    for key in ("mean", "std"):
        values = preprocess[key]
        numbers = isinstance(values, list) and len(values) == 3 and all(_is(v, (int, float)) for v in values)
        if not numbers or (key == "std" and min(values) <= 0):
            positive = " > 0" if key == "std" else ""
            raise refused(path, f"preprocess.{key}={shown(values)} is not 3 finite numbers{positive}")


def _check_version(meta: object, path: Path) -> None:
    """An object of this format, at this version (the only one read: bnn_adapt is unreleased)."""
    if not isinstance(meta, dict):
        raise refused(path, f"its {METADATA_KEY} metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} holds {shown(meta.get('format'))}, not an exported adapter")
    version = meta.get("version")
    if _is(version, int) and version > VERSION:
        raise ExportError(
            f"{path} is an adapter file of format version {version}, newer than this bnn_adapt reads ({VERSION}); "
            "upgrade bnn_adapt"
        )
    if not _is(version, int) or version != VERSION:
        raise ExportError(
            f"{path} is an adapter file of format version {shown(version)}, which this bnn_adapt does not read "
            f"(it reads {VERSION}); export the adapter again with task=export"
        )


def checked_meta(raw: str, path: Path) -> dict:
    """The metadata a file declares, every key checked (present, of its type, within sane limits) before
    anything is built or decompressed from it."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise refused(path, f"its {METADATA_KEY} metadata is not JSON ({shown(str(exc))})") from None
    _check_version(meta, path)
    missing, unknown = [k for k in KEYS if k not in meta], sorted(set(meta) - set(KEYS))
    if missing:
        raise refused(path, f"its metadata lacks {missing[0]}")
    if unknown:
        raise refused(path, f"unknown metadata {shown(unknown[0])}")
    for key, kind in KEYS.items():
        if not _is(meta[key], kind):
            raise refused(path, f"{key}={shown(meta[key])} is of the wrong type")
    _check_options(meta, path)
    count, names, (low, high) = meta["num_classes"], meta["class_names"], NUM_CLASSES
    if not low <= count <= high:
        raise refused(path, f"num_classes={count} is outside {low}..{high}")
    if names is not None and not (len(names) == count and all(_is(n, str) and len(n) <= NAME_CHARS for n in names)):
        raise refused(path, f"class_names are not {count} strings of at most {NAME_CHARS} characters")
    _check_preprocess(meta["preprocess"], path)
    if meta["dtype"] not in DTYPES:
        raise refused(path, f"dtype={shown(meta['dtype'])} is none of {', '.join(DTYPES)}")
    if set(meta["base"]) != {"arch", "arch_config", "fingerprint"} or not _is(meta["base"]["fingerprint"], str):
        raise refused(path, "base is not an architecture (arch, arch_config) with its fingerprint")
    tensors = meta["base_tensors"]
    if not all(_is(n, str) for n in tensors) or len(set(tensors)) < len(tensors):
        raise refused(path, "base_tensors are not distinct names")
    if any(how != "lzma" for how in meta["packing"].values()):
        raise refused(path, f"packing={shown(meta['packing'])} names a packing other than lzma")
    for name, entry in meta["encodings"].items():
        fields = isinstance(entry, dict) and set(entry) <= {"codec", "enc", "nnz"}
        if not fields or not _is(entry.get("codec", ""), str) or entry.get("enc", "dense") not in ENCODINGS:
            raise refused(path, f"encodings.{shown(name)}={shown(entry)} is no encoding of a tensor")
    return meta
