"""One base, many adapters: load a packed base once, attach adapter files, switch, predict.

    from bnn_adapt.deploy.predict import BaseWithAdapters

    bank = BaseWithAdapters.load("export/base.bnnpack")
    bank.attach("export/flowers.safetensors")
    bank.attach("export/pets.safetensors")        # the same base object, nothing reloaded
    bank.use("flowers")
    print(bank.predict(["rose.jpg"], k=3))          # [[("rose", 0.91), ("tulip", 0.05), ...]]

``task=predict base.file=... adapters=[a,b] inputs=DIR_OR_FILES`` does the same
from the command line and writes ``predictions.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from bnn_adapt.adapters.file import AttachedAdapter, attach_adapter
from bnn_adapt.deploy.packed_base import repack
from bnn_adapt.deploy.packed_inference import load_base, packed_or_float
from bnn_adapt.errors import ConfigError, DataError, ExportError
from bnn_adapt.training.datamodule import HALF
from bnn_adapt.training.datasets import open_rgb

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
        """Rebuild the adapter in ``path`` on this base and make it active; returns its name."""
        adapter = attach_adapter(path, self.base, self.fingerprint, name)
        if adapter.name in self.adapters:
            raise ConfigError(f"an adapter named {adapter.name!r} is attached already; pass another name")
        self.adapters[adapter.name] = adapter
        self.active = adapter.name
        return adapter.name

    def use(self, name: str) -> AttachedAdapter:
        """Switch to an attached adapter (the base stays as it is)."""
        if name not in self.adapters:
            raise ConfigError(f"no adapter named {name!r}; attached: {', '.join(self.adapters) or 'none'}")
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
            "image_size": self.base.input_size, "mean": HALF, "std": HALF,
        }  # fmt: skip
        transform = eval_transform(preprocess)
        return torch.stack([transform(open_rgb(str(p))) for p in paths])

    def predict(self, images: Sequence[str | Path] | torch.Tensor, k: int = 5, batch_size: int = 64
                ) -> list[list[tuple[str, float]]]:  # fmt: skip
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
                [(names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]
                for values, indices in zip(top.values, top.indices)
            ]
        return out


def run_predict(cfg) -> dict:
    """``task=predict``: every adapter on every input image; prints and writes predictions.json."""
    from bnn_adapt.run.results import write_json  # noqa: PLC0415

    if not cfg.base.get("file"):
        raise ExportError("task=predict needs base.file=PATH: a packed base written by task=export")
    adapters = list(cfg.get("adapters") or [])
    if not adapters:
        raise ConfigError("task=predict needs adapters=[FILE.safetensors,...]: adapters written by task=export")
    if not cfg.get("inputs"):
        raise ConfigError("task=predict needs inputs=IMAGE_OR_FOLDER (or a list of them)")
    k = int(cfg.predict.top_k)
    if k < 1:
        raise ConfigError(f"predict.top_k={k} is invalid: it must be a positive integer")
    inputs = cfg.inputs if isinstance(cfg.inputs, str) else list(cfg.inputs)
    files = image_files(inputs)
    bank = BaseWithAdapters.load(cfg.base.file, packed=bool(cfg.predict.get("packed", True)))
    names = [bank.attach(path) for path in adapters]
    results: dict[str, dict[str, list[dict]]] = {}
    for name in names:
        bank.use(name)
        top = bank.predict(files, k=k, batch_size=int(cfg.predict.batch_size))
        results[name] = {str(f): [{"class": c, "prob": round(p, 6)} for c, p in row] for f, row in zip(files, top)}
    for f in files:
        for name in names:
            shown = ", ".join(f"{r['class']} {r['prob']:.3f}" for r in results[name][str(f)])
            print(f"{f}  [{name}]  {shown}")
    output = Path(cfg.predict.output)
    summary = {"base": str(cfg.base.file), "fingerprint": bank.fingerprint, "top_k": k, "predictions": results}
    write_json(output, summary)
    print(f"predictions of {len(names)} adapter(s) for {len(files)} image(s) in {output}")
    return {"task": "predict", "images": len(files), "adapters": names, "predictions_file": str(output)}
