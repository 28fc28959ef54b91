"""``task=evaluate``: a base checkpoint on its base classes' test split, or a base plus an adapter file on the
target classes' test split, image by image.

The base is read as adaptation reads it (``base.checkpoint``, :func:`bnn_adapt.run.builders.load_trained_base`:
ours, the ReActNet authors' and every other format a base declares), with the BatchNorm statistics its file
holds; ``base.bn=recalibrate`` re-estimates them first on the training images of the evaluated classes (AdaBN,
:func:`bnn_adapt.training.precise_bn.recalibrate`) and says so. The adapter is an exported ``.safetensors``
file or the directory of the adaptation run that wrote one; it is refused for another base (its fingerprint)
or other classes. Writes ``metrics.json`` (a :class:`RunRecord`: top-1, per-class top-1, confusion matrix)
and ``predictions.csv``: ``source`` (where the image is, as its dataset names it: ``DatasetSpec.source``),
``label`` and ``predicted`` per test image, in the dataset's own order.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

from bnn_adapt.adapters.file import ADAPTER_FILE, attach_adapter
from bnn_adapt.bases.fingerprint import fingerprint
from bnn_adapt.errors import ConfigError, printable
from bnn_adapt.files import atomic_output
from bnn_adapt.run import builders
from bnn_adapt.run.record import COMPLETE, RunRecord
from bnn_adapt.run.records import results_record, write_record
from bnn_adapt.training.precise_bn import PreciseBN, recalibrate


def adapter_file(value: str | None) -> Path | None:
    """``evaluate.adapter``: an adapter file, or an adaptation run's directory holding one (None: no adapter)."""
    if not value:
        return None
    path = Path(value)
    if path.is_dir():
        if not (path / ADAPTER_FILE).is_file():
            raise ConfigError(
                f"evaluate.adapter={printable(path)} is a directory without {ADAPTER_FILE}: give a finished "
                "adaptation run's directory or an adapter file written by task=export"
            )
        return path / ADAPTER_FILE
    return path


def evaluation_device(cfg: DictConfig) -> torch.device:
    """A GPU where there is one and ``trainer.accelerator`` allows it, else the CPU."""
    use_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator", "auto") not in ("cpu",)
    return torch.device("cuda" if use_gpu else "cpu")


def check_classes(found: list[str], served: list[str], what: str, key: str) -> None:
    """``what`` predicts ``found``; the configured split serves ``served``: the same classes in the same order."""
    if list(found) != list(served):
        shown = ", ".join(map(printable, found))
        raise ConfigError(
            f"{what} predicts {len(found)} classes ({shown[:200]}), but {key} serves {len(served)} "
            f"({', '.join(map(printable, served))[:200]}); set {key} to the classes it was trained on"
        )


def check_preprocessing(preprocess: dict | None, datamodule, path: Path) -> None:
    """The adapter's recorded eval preprocessing (image size, mean, std) is the datamodule's."""
    if not preprocess:
        return
    ours = builders.preprocessing(datamodule)
    same = preprocess["image_size"] == ours["image_size"] and all(
        math.isclose(a, b, rel_tol=1e-6)
        for key in ("mean", "std")
        for a, b in zip(preprocess[key], ours[key], strict=True)
    )
    if not same:
        raise ConfigError(
            f"adapter {printable(path)} was trained on images preprocessed as {preprocess}, but data preprocesses "
            f"them as {ours}; set data.image_size, data.normalize_mean and data.normalize_std to its values"
        )


def evaluated_model(cfg: DictConfig, datamodule, device: torch.device) -> tuple[nn.Module, Path | None]:
    """The base at ``base.checkpoint`` (with its adapter, ``evaluate.adapter``), its BN statistics re-estimated
    first with ``base.bn=recalibrate``; in eval mode on ``device``. Returns it and the adapter file."""
    path = adapter_file(cfg.evaluate.get("adapter"))
    base = builders.load_trained_base(cfg)
    if path is None and base.num_classes != datamodule.num_classes:
        raise ConfigError(
            f"the base in {builders.base_checkpoint_file(cfg)} has {base.num_classes} classes, but data.base_classes "
            f"serves {datamodule.num_classes}; set data.base_classes to the classes it was pretrained on"
        )
    base_fingerprint = fingerprint(base) if path is not None else None  # of the file's statistics, as exported
    if cfg.base.bn == "recalibrate":
        batches = OmegaConf.select(cfg, "base.precise_bn.batches", default=PreciseBN().batches)
        used = recalibrate(base, datamodule, batches, device)
        print(
            f"base.bn=recalibrate: the base's BatchNorm statistics re-estimated on {used} training batches of the "
            f"{datamodule.split} classes (AdaBN); those in {builders.base_checkpoint_file(cfg)} are not used"
        )
    if path is None:
        return base.eval().to(device), None
    attached = attach_adapter(path, base, base_fingerprint)
    check_classes(attached.class_names, datamodule.class_names, f"adapter {printable(path)}", "data.target_classes")
    check_preprocessing(attached.meta.get("preprocess"), datamodule, path)
    if cfg.base.bn == "recalibrate" and attached.meta["base_tensors"]:
        count = len(attached.meta["base_tensors"])
        print(
            f"note: adapter {printable(path)} holds {count} base tensors of its own, which replace these while it runs"
        )
    attached.base_overrides = {name: t.to(device) for name, t in attached.base_overrides.items()}  # not buffers
    return attached.eval().to(device), path


@torch.no_grad()
def predictions(model: nn.Module, datamodule, device: torch.device) -> torch.Tensor:
    """The predicted class of every test image, in the dataset's order."""
    loader = datamodule.loader(datamodule.dataset("eval", train=False), shuffle=False, device=device)
    return torch.cat([model(images.to(device)).argmax(dim=1).cpu() for images, _ in loader])


def write_predictions(path: Path, sources: list[str], labels: list[str], predicted: list[str]) -> None:
    """predictions.csv: ``source,label,predicted``, one row per test image, whole or not at all."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("source", "label", "predicted"))
    writer.writerows(zip(sources, labels, predicted, strict=True))
    with atomic_output(path) as tmp:
        tmp.write_text(text.getvalue())


def run_evaluate(cfg: DictConfig) -> RunRecord:
    """``task=evaluate``: the configured base (and adapter) on its classes' test split; metrics.json and
    predictions.csv."""
    split = "target" if cfg.evaluate.get("adapter") else "base"
    datamodule = builders.build_datamodule(cfg, split)
    device = evaluation_device(cfg)
    datamodule.setup("test")
    model, path = evaluated_model(cfg, datamodule, device)
    predicted = predictions(model, datamodule, device)
    tested = datamodule.eval_set
    labels = torch.as_tensor(tested.labels, dtype=torch.long)
    names, n = datamodule.class_names, datamodule.num_classes
    per_class = multiclass_accuracy(predicted, labels, n, average="none").tolist()
    sources = [datamodule.spec.source(datamodule.root, tested.dataset, row) for row in tested.indices]
    out_csv = Path(cfg.evaluate.predictions)
    write_predictions(out_csv, sources, [names[k] for k in labels.tolist()], [names[k] for k in predicted.tolist()])
    measured = RunRecord(
        test_top1=float(multiclass_accuracy(predicted, labels, n, average="micro")),
        test_images=len(labels),
        per_class_top1=dict(zip(names, per_class, strict=True)),
        confusion_matrix=multiclass_confusion_matrix(predicted, labels, n).tolist(),
        class_names=names,
        base_checkpoint=builders.base_checkpoint_file(cfg),
        adapter_file=str(path) if path is not None else None,
        predictions_file=str(out_csv),
        device=str(device),
    )
    record = results_record(cfg, measured, COMPLETE)
    write_record(Path(cfg.evaluate.metrics), record)
    print(
        f"evaluate done: top-1 {record.test_top1:.4f} on {len(labels)} test images of the {split} classes; "
        f"results in {cfg.evaluate.metrics}, each image in {out_csv}"
    )
    return record
