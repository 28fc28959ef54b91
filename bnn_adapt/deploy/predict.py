"""One base, many adapters: load a packed base once, attach adapter files, switch, predict.

    from bnn_adapt.deploy.predict import BaseWithAdapters

    bank = BaseWithAdapters.load("export/base.bnnpack")
    bank.attach("export/flowers.safetensors")
    bank.attach("export/pets.safetensors")        # the same base object, nothing reloaded
    bank.use("flowers")
    print(bank.predict(["rose.jpg"], k=3))          # [[("rose", 0.91), ("tulip", 0.05), ...]]

``task=predict base.file=... adapters=[a,b] inputs=DIR_OR_FILES`` does the same
from the command line and writes ``predictions.json``; ``adapters={flowers: a, pets: b}``
names the adapters (otherwise they are named after their files, :func:`adapter_name`).
Everything printed that comes from a file (class and adapter names, paths) is escaped
(:func:`~bnn_adapt.errors.printable`); the JSON file keeps the real strings.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from bnn_adapt.adapters.file import ADAPTER_FILE, AttachedAdapter, attach_adapter
from bnn_adapt.deploy.packed_base import repack
from bnn_adapt.deploy.packed_inference import load_base, packed_or_float
from bnn_adapt.errors import ConfigError, DataError, ExportError, UserError, printable
from bnn_adapt.files import WriteError, atomic_output
from bnn_adapt.training.datamodule import HALF
from bnn_adapt.training.datasets import open_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def eval_transform(preprocess: dict) -> v2.Compose:
    """The adaptation run's eval pipeline (``ClassSplitDataModule.transform(train=False)``)."""
    size = preprocess["image_size"]
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((size, size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocess["mean"]), list(preprocess["std"])),
        ]
    )


def image_files(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files from a file, a folder (searched recursively) or a list of either, in a stable order."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"inputs: {path} is neither an image file nor a folder")
    if not found:
        raise DataError(f"inputs={[str(i) for i in items]} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def adapter_name(path: str | Path, taken: Collection[str] = ()) -> str:
    """A name for the adapter in ``path`` that none in ``taken`` has: the file's name, or its folder's where
    the file has the name every adaptation run writes (``row=udta_g20/adapter.safetensors``: ``row=udta_g20``),
    numbered (``_2``, ``_3``, ...) while still taken."""
    path = Path(path)
    name = path.stem
    if path.name == ADAPTER_FILE:
        name = path.absolute().parent.name or name
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    return unique


class FilesSkipped(UserError):
    """``task=predict`` printed and wrote its predictions, but skipped some files (each named in a warning);
    the command line exits with status 2 after this one line. ``result`` is what the task returns otherwise."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


class BaseWithAdapters:
    """A packed base (loaded once) and the adapters attached to it; one is active.

    ``packed=True`` (default): the base's binary layers run on 1-bit kernels where
    they are built (:mod:`bnn_adapt.deploy.packed_inference`); False: fp32 convs.
    """

    def __init__(self, base: nn.Module, header: dict, packed: bool = True):
        self.base = packed_or_float(base.eval(), packed)
        self.header = header
        self.fingerprint: str = header["fingerprint"]
        self.adapters: dict[str, AttachedAdapter] = {}
        self.active: str | None = None

    @classmethod
    def load(cls, path: str | Path, packed: bool = True) -> BaseWithAdapters:
        """From a packed base file (``task=export`` writes ``base.bnnpack``)."""
        return cls(*load_base(path, packed), packed=packed)

    @classmethod
    def from_base(cls, base: nn.Module, packed: bool = True) -> BaseWithAdapters:
        """From a base in memory, as its packed file would rebuild it."""
        return cls(*repack(base), packed=packed)

    def attach(self, path: str | Path, name: str | None = None) -> str:
        """Rebuild the adapter in ``path`` on this base and make it active; returns its name: ``name``, or
        one no attached adapter has (:func:`adapter_name`). An explicit name already attached is refused."""
        if name is None:
            name = adapter_name(path, self.adapters)
        elif name in self.adapters:
            picked = adapter_name(path, self.adapters)
            raise ConfigError(
                f"an adapter named '{printable(name)}' is attached already; pass another name, or none "
                f"to have one picked ('{printable(picked)}')"
            )
        adapter = attach_adapter(path, self.base, self.fingerprint, name)
        self.adapters[adapter.name] = adapter
        self.active = adapter.name
        return adapter.name

    def use(self, name: str) -> AttachedAdapter:
        """Switch to an attached adapter (the base stays as it is)."""
        if name not in self.adapters:
            attached = ", ".join(map(printable, self.adapters)) or "none"
            raise ConfigError(f"no adapter named '{printable(name)}'; attached: {attached}")
        self.active = name
        return self.adapters[name]

    @property
    def adapter(self) -> AttachedAdapter:
        if self.active is None:
            raise ConfigError("no adapter attached; call attach(path) first")
        return self.adapters[self.active]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the active adapter for a preprocessed batch."""
        return self.adapter(images)

    def preprocess(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files -> the batch the active adapter was evaluated on in training."""
        preprocess = self.adapter.meta.get("preprocess") or {
            "image_size": self.base.input_size,
            "mean": HALF,
            "std": HALF,
        }
        transform = eval_transform(preprocess)
        return torch.stack([transform(open_rgb(str(p))) for p in paths])

    def predict(
        self, images: Sequence[str | Path] | torch.Tensor, k: int = 5, batch_size: int = 64
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(class name, probability)`` per image, from files or a preprocessed batch."""
        names = self.adapter.class_names
        k = min(k, len(names))
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else self.preprocess(chunk)
            probs = self(batch).softmax(dim=1)
            top = probs.topk(k, dim=1)
            out += [
                [(names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]
                for values, indices in zip(top.values, top.indices, strict=True)
            ]
        return out


def named_adapters(adapters: object) -> list[tuple[str | None, str]]:
    """``adapters=`` as ``(name, path)`` pairs: a dict (``{flowers: a.safetensors}``) names them; a list, or
    one path, leaves the name to :func:`adapter_name` (None)."""
    if isinstance(adapters, Mapping):
        return [(str(name), str(path)) for name, path in adapters.items()]
    if isinstance(adapters, (str, Path)):
        adapters = [adapters]
    return [(None, str(path)) for path in adapters or ()]


def run_predict(cfg) -> dict:
    """``task=predict``: every adapter on every input image; prints the predictions, then writes predictions.json.

    Files from others are taken one by one: an image that cannot be read (not an image, truncated, a
    decompression bomb) or an adapter file that is refused is one warning line naming it and why, and
    everything else is still predicted; predictions.json lists what was skipped (``skipped``). Exit status:
    0 when nothing was skipped; otherwise the predictions are printed and written all the same, then
    :class:`FilesSkipped` ends the command with one line naming the skipped files and exit status 2. With
    no adapter or no image left, nothing is predicted: one error line. A probability that is not finite
    is written as null (JSON has no NaN), with a warning.
    """
    if not cfg.base.get("file"):
        raise ExportError("task=predict needs base.file=PATH: a packed base written by task=export")
    named = named_adapters(cfg.get("adapters"))
    if not named:
        raise ConfigError(
            "task=predict needs adapters=[FILE.safetensors,...] or adapters={NAME: FILE,...}: adapters written by "
            "task=export"
        )
    if not cfg.get("inputs"):
        raise ConfigError("task=predict needs inputs=IMAGE_OR_FOLDER (or a list of them)")
    k = int(cfg.predict.top_k)
    if k < 1:
        raise ConfigError(f"predict.top_k={k} is invalid: it must be a positive integer")
    inputs = cfg.inputs if isinstance(cfg.inputs, str) else list(cfg.inputs)
    files = image_files(inputs)
    bank = BaseWithAdapters.load(cfg.base.file, packed=bool(cfg.predict.get("packed", True)))
    skipped: list[dict] = []

    def skip(path: str | Path, kind: str, exc: UserError) -> None:
        log.warning("skipped: %s", printable(exc if str(path) in str(exc) else f"{kind} {path}: {exc}"))
        skipped.append({"file": str(path), "kind": kind, "reason": str(exc)})

    adapter_paths: dict[str, str] = {}
    for name, path in named:
        try:
            adapter_paths[bank.attach(path, name)] = path
        except UserError as exc:
            skip(path, "adapter", exc)
    if not adapter_paths:
        raise ExportError(f"none of the {len(named)} adapter file(s) could be attached (see the warnings above)")
    readable = []
    for f in files:
        try:
            open_rgb(str(f))
            readable.append(f)
        except DataError as exc:
            skip(f, "image", exc)
    if not readable:
        raise DataError(f"none of the {len(files)} image(s) could be read (see the warnings above)")

    results: dict[str, dict[str, list[dict]]] = {}
    for name in adapter_paths:
        bank.use(name)
        top = bank.predict(readable, k=k, batch_size=int(cfg.predict.batch_size))
        rows = [[{"class": c, "prob": round(p, 6) if math.isfinite(p) else None} for c, p in row] for row in top]
        if bad := sum(any(r["prob"] is None for r in row) for row in rows):
            shown = printable(name)
            log.warning("adapter %s: NaN or infinite probabilities for %d image(s), written as null", shown, bad)
        results[name] = {str(f): row for f, row in zip(readable, rows, strict=True)}
    for f in readable:
        for name in adapter_paths:
            shown = ", ".join(f"{printable(r['class'])} {shown_prob(r['prob'])}" for r in results[name][str(f)])
            print(f"{printable(f)}  [{printable(name)}]  {shown}")

    output = Path(cfg.predict.output)
    summary = {
        "base": str(cfg.base.file),
        "fingerprint": bank.fingerprint,
        "top_k": k,
        "adapters": adapter_paths,
        "predictions": results,
        "skipped": skipped,
    }
    try:
        with atomic_output(output) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    except WriteError as exc:
        raise WriteError(exc.errno, f"{exc.strerror}; the predictions are printed above") from None
    print(f"predictions of {len(adapter_paths)} adapter(s) for {len(readable)} image(s) in {printable(output)}")
    result = {
        "task": "predict",
        "images": len(readable),
        "adapters": list(adapter_paths),
        "predictions_file": str(output),
        "skipped": [entry["file"] for entry in skipped],
    }
    if skipped:
        listed = ", ".join(printable(entry["file"]) for entry in skipped)
        raise FilesSkipped(
            f"predictions written to {printable(output)}, but {len(skipped)} file(s) were skipped (see the warnings "
            f"above; 'skipped' in the file says why): {listed}",
            result,
        )
    return result


def shown_prob(prob: float | None) -> str:
    return "n/a" if prob is None else f"{prob:.3f}"
