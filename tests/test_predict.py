"""One base, many adapters: the Python API (load once, attach, switch, predict)
and ``task=predict`` on image files, with top-k class names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import bnn_adapt.deploy.predict as predict_module
from bnn_adapt.deploy.packed_base import write_packed_base
from bnn_adapt.deploy.predict import BaseWithAdapters, image_files
from bnn_adapt.errors import ConfigError, DataError, ExportError, FingerprintError
from bnn_adapt.run import task
from tests.helpers.files import write_images
from tests.helpers.models import CLASSES, PREPROCESS, make_base

# CIFAR-10 0-4's statistics: mean and std differ per channel and from each other


def preprocessed_independently(paths: list[Path], preprocess: dict) -> torch.Tensor:
    """The eval preprocessing as the adapter file records it (RGB, resize to image_size, scale to [0, 1],
    normalise with the run's mean and std), written here with torchvision's functional API."""
    size = preprocess["image_size"]
    batch = []
    for path in paths:
        image = TF.pil_to_tensor(Image.open(path).convert("RGB"))
        image = TF.resize(image, [size, size], antialias=True).float() / 255
        batch.append(TF.normalize(image, preprocess["mean"], preprocess["std"]))
    return torch.stack(batch)


def reference_top_k(model, batch: torch.Tensor, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    with torch.no_grad():
        top = model(batch).softmax(1).topk(k, dim=1)
    return [
        [(names[i], p) for p, i in zip(v.tolist(), ix.tolist(), strict=True)]
        for v, ix in zip(top.values, top.indices, strict=True)
    ]


def test_api_switches_adapters_on_one_base_without_touching_it(exported):
    bank = BaseWithAdapters.load(exported["base"])
    before = {k: v.clone() for k, v in bank.base.state_dict().items()}
    names = [bank.attach(exported["files"][s]) for s in CLASSES]
    assert names == list(CLASSES) and bank.active == "lora"
    assert all(a.model.base is bank.base for a in bank.adapters.values())
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = {s: exported["models"][s](x) for s in CLASSES}
    for name in ["udta", "lora", "udta", "lora"]:
        bank.use(name)
        assert torch.equal(bank(x), expected[name])
    after = bank.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in bank.base.modules())  # LoRA hooks only while it runs
    top = bank.predict(x, k=2)
    probs = expected["lora"].softmax(1)
    for row, p in zip(top, probs, strict=True):
        assert [c for c, _ in row] == [CLASSES["lora"][i] for i in p.topk(2).indices.tolist()]
        assert [q for _, q in row] == pytest.approx(p.topk(2).values.tolist())
    with pytest.raises(ConfigError, match="attached: udta, lora"):
        bank.use("nope")


def test_predict_from_files_uses_the_adapters_eval_preprocessing(exported, tmp_path):
    """Files -> top-k: the same as the trained model (not the exported file) on images preprocessed
    independently of bnn_adapt."""
    paths = write_images(tmp_path / "images")
    assert image_files(tmp_path / "images") == paths
    bank = BaseWithAdapters.load(exported["base"])
    bank.attach(exported["files"]["udta"])
    batch = preprocessed_independently(paths, PREPROCESS)
    assert batch.shape == (5, 3, 32, 32)
    assert torch.allclose(bank.preprocess(paths), batch, rtol=0, atol=1e-6)  # ToDtype multiplies by 1/255
    expected = reference_top_k(exported["models"]["udta"], batch, CLASSES["udta"], 3)
    top = bank.predict(paths, k=3, batch_size=2)
    assert [[c for c, _ in row] for row in top] == [[c for c, _ in row] for row in expected]
    for row, reference in zip(top, expected, strict=True):
        assert [p for _, p in row] == pytest.approx([p for _, p in reference], rel=1e-5)


def test_task_predict_loads_the_base_once_and_writes_every_adapters_top_k(exported, make_cfg, tmp_path, monkeypatch):
    paths = write_images(tmp_path / "images")
    loads = []
    original = predict_module.load_base
    monkeypatch.setattr(predict_module, "load_base", lambda p, packed: loads.append(p) or original(p, packed))
    files = ",".join(str(exported["files"][s]) for s in CLASSES)
    out = tmp_path / "preds.json"
    cfg = make_cfg(
        "task=predict",
        f"base.file={exported['base']}",
        f"adapters=[{files}]",
        f"inputs={tmp_path / 'images'}",
        "predict.top_k=3",
        f"predict.output={out}",
        name="predict",
    )
    result = task.run(cfg)
    assert len(loads) == 1 and result["images"] == 5 and result["adapters"] == list(CLASSES)
    written = json.loads(out.read_text())
    assert set(written["predictions"]) == set(CLASSES)
    batch = preprocessed_independently(paths, PREPROCESS)
    for strategy in CLASSES:
        rows = written["predictions"][strategy]
        assert list(rows) == [str(p) for p in paths]
        expected = reference_top_k(exported["models"][strategy], batch, CLASSES[strategy], 3)
        for path, reference in zip(paths, expected, strict=True):
            assert [r["class"] for r in rows[str(path)]] == [c for c, _ in reference]
            assert [r["prob"] for r in rows[str(path)]] == pytest.approx(
                [p for _, p in reference], abs=1e-6
            )  # 6 decimals


def test_task_predict_errors_are_clear(exported, make_cfg, tmp_path):
    images = tmp_path / "images"
    write_images(images, n=1)
    adapter = exported["files"]["udta"]
    cases = [
        (["task=predict", f"adapters=[{adapter}]", f"inputs={images}"], ExportError, "base.file"),
        (["task=predict", f"base.file={exported['base']}", f"inputs={images}"], ConfigError, "adapters="),
        (["task=predict", f"base.file={exported['base']}", f"adapters=[{adapter}]"], ConfigError, "inputs="),
        (
            ["task=predict", f"base.file={exported['base']}", f"adapters=[{adapter}]", f"inputs={tmp_path / 'none'}"],
            DataError,
            "neither an image",
        ),
        (
            ["task=predict", f"base.file={tmp_path / 'x.bnnpack'}", f"adapters=[{adapter}]", f"inputs={images}"],
            ExportError,
            "does not exist",
        ),
    ]
    for i, (overrides, error, match) in enumerate(cases):
        with pytest.raises(error, match=match):
            task.run(make_cfg(*overrides, name=f"case{i}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        image_files(tmp_path / "empty")


def test_an_adapter_of_another_base_is_refused_on_attach(exported, tmp_path):
    other, _ = make_base("ste", seed=7)
    write_packed_base(other, tmp_path / "other.bnnpack")
    bank = BaseWithAdapters.load(tmp_path / "other.bnnpack")
    with pytest.raises(FingerprintError, match=bank.fingerprint):
        bank.attach(exported["files"]["udta"])
    assert bank.adapters == {}
