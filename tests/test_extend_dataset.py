"""The "Adding a dataset" guide (docs/extending.md), proven: a toy dataset defined in a module of its own and
a ``conf/data`` file, both outside the repository, pretrains a base, adapts it, and exports and predicts,
with no other file touched."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from bnn_adapt.run import task
from bnn_adapt.training.data_fingerprint import data_identity
from bnn_adapt.training.datasets import find
from tests.helpers.config import compose_config

TOY_MODULE = '''
"""Toy stripes: six colours of 12-px images, one .npz file per split under data.root."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bnn_adapt.training.datasets import HALF, DatasetSpec
from bnn_adapt.training.datasets.generated import labelled_images

SPLITS = ("train", "test")


def files(root):
    return Path(root), [Path(root) / f"{split}.npz" for split in SPLITS]


def missing(root):
    absent = [path.name for path in files(root)[1] if not path.is_file()]
    return f"{root} lacks {', '.join(absent)}" if absent else None


def load(root, download):
    parts = []
    for path in files(root)[1]:
        with np.load(path) as arrays:
            images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W)
            labels = torch.from_numpy(arrays["labels"]).long()
        parts.append((TensorDataset(images, labels), labels.tolist()))
    return tuple(parts)


def synthetic(root, n_per_class=8):
    Path(root).mkdir(parents=True, exist_ok=True)
    for seed, path in enumerate(files(root)[1]):
        images, labels = labelled_images(6, n_per_class, 12, 3, seed)
        np.savez(path, images=images, labels=labels)
    return Path(root)


DATASET = DatasetSpec(
    "Toy stripes",
    load,
    ("red", "green", "blue", "cyan", "magenta", "yellow"),
    HALF,
    HALF,
    large=False,
    missing=missing,
    files=files,
    synthetic=synthetic,
)
'''

TOY_CONFIG = """
# toy stripes: base red..blue, target cyan..yellow
defaults:
  - _base_
name: toy_stripes
root: ${paths.data_dir}/toy
base_classes: [0, 1, 2]
target_classes: [3, 4, 5]
"""


def test_a_dataset_in_its_own_module_and_yaml_runs_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "toy_stripes.py").write_text(textwrap.dedent(TOY_MODULE))
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "toy3_3.yaml").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    data_dir, base_dir = tmp_path / "data", tmp_path / "bases"
    find("toy_stripes").synthetic(data_dir / "toy")

    def config(*overrides: str, name: str):
        toy = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "data=toy3_3"]
        return compose_config([*toy, *overrides], tmp_path / name, data_dir, base_dir)

    pretrain = config("task=pretrain", "adapter=full_finetune", "trainer.max_epochs=1", name="pretrain")
    task.run(pretrain)
    assert Path(pretrain.base.save_to).is_file()

    adapt = config("adapter=udta", "trainer.max_epochs=1", name="adapt")
    metrics = task.run(adapt)
    assert metrics["class_names"] == ["cyan", "magenta", "yellow"]
    identity = data_identity("toy_stripes", adapt.data.root)  # the fingerprint covers the module's files
    assert identity["files"] == 2 and identity["location"] == str((data_dir / "toy").resolve())

    manifest = task.run(
        config(
            "task=export",
            f"export.adapter_run=[{adapt.paths.output_dir}]",
            f"export.dir={tmp_path / 'export'}",
            name="export",
        )
    )
    adapter_file = next(tmp_path / "export" / name for name, e in manifest["files"].items() if e["kind"] == "adapter")

    images = tmp_path / "images"
    images.mkdir()
    with np.load(data_dir / "toy" / "test.npz") as arrays:
        for i in range(3):
            Image.fromarray(arrays["images"][i]).save(images / f"toy_{i}.png")
    out = tmp_path / "predictions.json"
    predict = config(
        "task=predict",
        f"base.file={tmp_path / 'export' / 'base.bnnpack'}",
        f"adapters=[{adapter_file}]",
        f"inputs={images}",
        "predict.top_k=2",
        f"predict.output={out}",
        name="predict",
    )
    assert task.run(predict)["images"] == 3
    rows = next(iter(json.loads(out.read_text())["predictions"].values()))
    assert {r["class"] for row in rows.values() for r in row} <= {"cyan", "magenta", "yellow"}
