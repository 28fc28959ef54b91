"""``task=evaluate``: a base checkpoint on its base classes' test split and a base plus adapter on the target
classes', image by image: metrics.json agrees with predictions.csv, whose rows name each test image where its
dataset keeps it."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import torch

from bnn_adapt.bases import save_base
from bnn_adapt.errors import CheckpointError, ConfigError, FingerprintError
from bnn_adapt.run import builders, task
from bnn_adapt.run.evaluate import evaluated_model
from bnn_adapt.run.record import RunRecord
from bnn_adapt.training.datasets import find
from bnn_adapt.training.datasets.cifar10 import CLASSES
from bnn_adapt.training.precise_bn import batch_norms
from tests.helpers.config import compose_config


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cifar_test_rows(data_dir: Path, keep) -> tuple[list[str], list[str]]:
    """(source, class name) of the generated CIFAR-10 test_batch's rows whose label ``keep`` accepts, in file order."""
    with open(data_dir / "cifar10" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    kept = [(row, label) for row, label in enumerate(labels) if keep(label)]
    return [f"test_batch:{row}" for row, _ in kept], [CLASSES[label] for _, label in kept]


def check_agrees(metrics: dict, rows: list[dict]) -> None:
    """metrics.json's numbers are those of predictions.csv's rows."""
    names = metrics["class_names"]
    assert metrics["test_images"] == len(rows)
    assert metrics["test_top1"] == pytest.approx(sum(r["label"] == r["predicted"] for r in rows) / len(rows))
    matrix = metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == len(rows)
    for i, name in enumerate(names):
        of_class = [r for r in rows if r["label"] == name]
        assert sum(matrix[i]) == len(of_class)
        assert matrix[i][i] == sum(r["predicted"] == name for r in of_class)
        assert metrics["per_class_top1"][name] == pytest.approx(matrix[i][i] / len(of_class))


@pytest.fixture(scope="module")
def adaptation_run(tmp_path_factory, data_dir, shared_base_dir, pretrained_base) -> Path:
    """A finished head-only adaptation of the pretrained base to CIFAR-10 5-9 (its directory holds adapter.safetensors)."""
    out = tmp_path_factory.mktemp("adapt") / "run"
    cfg = compose_config(["data=cifar5_5", "adapter=head_only", "trainer.max_epochs=1"], out, data_dir, shared_base_dir)
    task.run(cfg)
    return out


def test_base_on_its_base_classes(make_cfg, pretrained_base, data_dir):
    cfg = make_cfg("data=cifar5_5", "task=evaluate", name="evaluate")
    metrics = task.run(cfg)
    out = Path(cfg.paths.output_dir)
    rows = rows_of(out / "predictions.csv")
    sources, labels = cifar_test_rows(data_dir, lambda label: label < 5)
    assert [r["source"] for r in rows] == sources
    assert [r["label"] for r in rows] == labels
    assert metrics["task"] == "evaluate" and metrics["base_checkpoint"] == str(pretrained_base["checkpoint"])
    assert "adapter_file" not in metrics
    check_agrees(metrics, rows)
    check_agrees(RunRecord.from_json(out / "metrics.json").to_dict(), rows)


def test_base_with_adapter_on_the_target_classes(make_cfg, adaptation_run, data_dir):
    cfg = make_cfg("data=cifar5_5", "task=evaluate", f"evaluate.adapter={adaptation_run}", name="evaluate")
    metrics = task.run(cfg)
    rows = rows_of(Path(cfg.paths.output_dir) / "predictions.csv")
    sources, labels = cifar_test_rows(data_dir, lambda label: label >= 5)
    assert [r["source"] for r in rows] == sources
    assert [r["label"] for r in rows] == labels
    assert metrics["adapter_file"] == str(adaptation_run / "adapter.safetensors")
    assert metrics["class_names"] == list(CLASSES[5:])
    check_agrees(metrics, rows)
    # the same weights, statistics and images as the adaptation's last test
    assert metrics["test_top1"] == pytest.approx(RunRecord.read(adaptation_run).test_top1)


def test_an_adapter_that_carries_base_tensors_agrees_with_its_run(make_cfg, pretrained_base, data_dir):
    """Full finetuning's file replaces every base tensor (BN statistics re-estimated at its end included)."""
    adapt = make_cfg("data=cifar5_5", "adapter=full_finetune", "trainer.max_epochs=1", name="finetune")
    trained = task.run(adapt)
    cfg = make_cfg("data=cifar5_5", "task=evaluate", f"evaluate.adapter={adapt.paths.output_dir}", name="evaluate")
    metrics = task.run(cfg)
    check_agrees(metrics, rows_of(Path(cfg.paths.output_dir) / "predictions.csv"))
    assert metrics["test_top1"] == pytest.approx(trained["test_top1"])


def test_each_dataset_names_its_test_images(tmp_path):
    """``DatasetSpec.source``: the file and row, or the path under ``data.root``."""
    expected = {
        "cifar10": "test_batch:1",
        "cifar100": "test:1",
        "fashion_mnist": "t10k-images-idx3-ubyte:1",
        "flowers102": "flowers-102/jpg/image_00",
        "pets": "oxford-iiit-pet/images/",
        "digits": "test:1",
    }
    for name, start in expected.items():
        spec = find(name)
        if spec.synthetic is not None:
            spec.synthetic(tmp_path / name)
        _, (held_out, _) = spec.load(str(tmp_path / name), False)
        assert spec.source(str(tmp_path / name), held_out, 1).startswith(start), name


def test_recalibrate_re_estimates_the_base_statistics_and_says_so(make_cfg, pretrained_base, capsys):
    def statistics(*overrides: str) -> list[torch.Tensor]:
        cfg = make_cfg("data=cifar5_5", "task=evaluate", *overrides)
        datamodule = builders.build_datamodule(cfg, "base")
        datamodule.setup("test")
        model, _ = evaluated_model(cfg, datamodule, torch.device("cpu"))
        return [m.running_mean.clone() for m in batch_norms(model)]

    held = statistics()
    assert "recalibrate" not in capsys.readouterr().out
    recalibrated = statistics("base.bn=recalibrate")
    assert "base.bn=recalibrate: the base's BatchNorm statistics re-estimated" in capsys.readouterr().out
    assert any(not torch.equal(a, b) for a, b in zip(held, recalibrated, strict=True))


def test_imagefolder_sources_are_relative_paths(make_cfg, data_dir, tmp_path):
    classes = ("data=imagefolder", "data.base_classes=[cat,dog]", "data.target_classes=[bird]")
    cfg = make_cfg(*classes, "task=evaluate", f"base.checkpoint={tmp_path / 'base.pt'}")
    save_base(builders.build_base(cfg), cfg.base.checkpoint, image_size=cfg.data.image_size)
    metrics = task.run(cfg)
    rows = rows_of(Path(cfg.paths.output_dir) / "predictions.csv")
    root = data_dir / "my_images"
    expected = [p.relative_to(root).as_posix() for c in ("cat", "dog") for p in sorted((root / "test" / c).iterdir())]
    assert [r["source"] for r in rows] == expected
    assert [r["label"] for r in rows] == [Path(s).parent.name for s in expected]
    check_agrees(metrics, rows)


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_bad_input_is_one_line(make_cfg, pretrained_base, adaptation_run, tmp_path):
    with pytest.raises(CheckpointError) as exc:
        task.run(make_cfg("data=cifar5_5", "task=evaluate", f"base.checkpoint={tmp_path / 'none.pt'}"))
    assert "does not exist" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        base = f"base.checkpoint={pretrained_base['checkpoint']}"
        task.run(make_cfg("data=cifar5_5", "task=evaluate", base, "data.base_classes=[0,1,2]"))
    assert "has 5 classes, but data.base_classes serves 3" in one_line(exc)
    adapter = f"evaluate.adapter={adaptation_run}"
    with pytest.raises(ConfigError) as exc:
        task.run(make_cfg("data=cifar5_5", "task=evaluate", adapter, "data.target_classes=[9,8,7,6,5]"))
    assert "set data.target_classes to the classes it was trained on" in one_line(exc)
    other = make_cfg("data=cifar5_5", "task=evaluate", adapter, f"base.checkpoint={tmp_path / 'other.pt'}")
    save_base(builders.build_base(other), other.base.checkpoint, image_size=other.data.image_size)
    with pytest.raises(FingerprintError) as exc:
        task.run(other)
    assert "fingerprint" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        task.run(make_cfg("data=cifar5_5", "task=evaluate", f"evaluate.adapter={tmp_path}"))
    assert "without adapter.safetensors" in one_line(exc)
