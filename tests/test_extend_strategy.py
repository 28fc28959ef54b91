"""docs/extending.md "Adding a strategy", proven: a strategy's own module and its YAML are all it needs.

A toy strategy is written to a temporary module and its ``conf/adapter/toy.yaml`` to a temporary config
dir (on Hydra's search path); it then adapts, exports and predicts end to end, its label and export warning
coming from what it declares, no other file touched.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from bnn_adapt import adapters
from bnn_adapt.adapters import STRATEGIES
from bnn_adapt.run import task

TOY_MODULE = '''
"""A toy strategy: a 1x1 conv residual on the frozen base's last stage, under a new head."""

from dataclasses import dataclass

import torch
from torch import nn

from bnn_adapt.adapters.strategy import AdaptedModel


@dataclass
class ToyOptions:
    scale: float = 1.0


class Toy(AdaptedModel):
    strategy = "toy"
    options_class = ToyOptions
    sign_sensitive = True

    def __init__(self, base, num_classes, freeze_bn=True, scale=1.0):
        super().__init__(base, num_classes, freeze_bn)
        channels = base.stage_channels[-1]
        self.config = ToyOptions(scale)
        self.adapter = nn.Conv2d(channels, channels, 1, bias=False)
        self.head = base.new_head(channels, num_classes)

    @classmethod
    def describe(cls, options):
        return f"toy x{options.get('scale')}"

    def forward(self, x):
        with torch.no_grad():
            features = self.base.stage_outputs(x)[-1]
        return self.head(self.base.pre_classifier(features + self.config.scale * self.adapter(features)))
'''

TOY_YAML = """
# a toy strategy (tests/test_extend_strategy.py)
name: toy
lr: 1.0e-3
scale: 2.0   # weight of the residual
bits: 32     # its weights train at fp32
model:
  _target_: bnn_adapt.adapters.toy.Toy
  scale: ${adapter.scale}
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy strategy's module as ``bnn_adapt/adapters/toy.py`` (the package's path extended to a temporary
    folder: configs may only name ``bnn_adapt.*``) and its YAML on Hydra's search path (an override); both
    gone, and the strategy unregistered, afterwards."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "toy.py").write_text(TOY_MODULE)
    conf = tmp_path / "conf" / "adapter"
    conf.mkdir(parents=True)
    (conf / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.setattr(adapters, "__path__", [*adapters.__path__, str(code)])
    try:
        yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    finally:
        STRATEGIES.pop("toy", None)
        sys.modules.pop("bnn_adapt.adapters.toy", None)


def test_a_strategy_module_and_its_yaml_adapt_export_and_predict(toy, pretrained_base, make_cfg, tmp_path, caplog):
    cfg = make_cfg(toy, "data=cifar5_5", "adapter=toy", "trainer.max_epochs=1", name="toy_run")
    metrics = task.run(cfg)
    assert metrics["strategy"] == "toy" and metrics["test_top1"] is not None
    assert STRATEGIES["toy"].__name__ == "Toy"

    out = tmp_path / "export"
    exported = make_cfg(
        toy,
        "task=export",
        f"export.adapter_run=[{cfg.paths.output_dir}]",
        f"export.dir={out}",
        "export.dtype=fp16",
        name="export",
    )
    manifest = task.run(exported)
    adapters = {name: entry for name, entry in manifest["files"].items() if entry["kind"] == "adapter"}
    assert list(adapters) == ["toy_x2.0.safetensors"]  # its label, from its own describe()
    assert adapters["toy_x2.0.safetensors"]["strategy"] == "toy"
    assert "a toy adapter's output is binarised again downstream" in caplog.text  # its own sign_sensitive

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
    predicted = make_cfg(
        toy,
        "task=predict",
        f"base.file={out / 'base.bnnpack'}",
        f"adapters=[{out / 'toy_x2.0.safetensors'}]",
        f"inputs={images}",
        "predict.top_k=2",
        f"predict.output={tmp_path / 'predictions.json'}",
        name="predict",
    )
    result = task.run(predicted)
    assert result["images"] == 3 and result["adapters"] == ["toy_x2.0"]
    rows = json.loads((tmp_path / "predictions.json").read_text())["predictions"]["toy_x2.0"]
    assert len(rows) == 3 and all(len(top) == 2 for top in rows.values())
