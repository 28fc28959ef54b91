"""The "Adding a base" guide (docs/extending.md), proven: a toy binary base defined in a module outside the
package, with its ``conf/base/<name>.yaml`` in a config folder of its own, pretrains, adapts, exports and
predicts without any other file knowing it."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from bnn_adapt.bases import BASES
from bnn_adapt.deploy.packed_base import read_packed_base
from bnn_adapt.errors import ConfigError
from bnn_adapt.run import task
from bnn_adapt.run.config import validate

TOY_MODULE = '''
"""A tiny binary network: an fp32 stem, two stages of one binary conv each, an fp32 head."""

from torch import nn

from bnn_adapt.bases import BaseNetwork
from bnn_adapt.bases.base import scaled
from bnn_adapt.nn.layers import BinaryConv2d


def stage(c_in, c_out, stride):
    return nn.Sequential(
        BinaryConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.Hardtanh()
    )


class ToyBNN(BaseNetwork):
    arch = "toy_bnn"
    input_size = 32
    min_input_size = 4

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        self.num_classes, self.width = num_classes, width
        channels = [scaled(c, width) for c in (64, 128)]
        self.stage_channels = channels
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]))
        self.stages = nn.ModuleList([stage(channels[0], channels[0], 1), stage(channels[0], channels[1], 2)])
        self.classifier = self.new_head(channels[-1], num_classes)
'''

TOY_CONFIG = """
name: toy_bnn
width: 1.0
bn: frozen
epoch: last
checkpoint: ${paths.base_dir}/${base.name}_w${base.width}_${data.name}_${classes_tag:${data.base_classes}}.pt
save_to: ${base.checkpoint}
how_to_get: train it first with task=pretrain base=toy_bnn or pass base.checkpoint=PATH
pretrain: null
precise_bn:
  enabled: false
  batches: 5
  every_epoch: false
  adaptation: false
net:
  _target_: toy_bnn_base.ToyBNN
  width: ${base.width}
  num_classes: ${len:${data.base_classes}}
"""


@pytest.fixture
def toy_base(tmp_path, monkeypatch):
    """The toy base's module on ``sys.path`` and its config in a folder of its own: the searchpath override."""
    code, conf = tmp_path / "code", tmp_path / "conf"
    (code).mkdir()
    (code / "toy_bnn_base.py").write_text(textwrap.dedent(TOY_MODULE))
    (conf / "base").mkdir(parents=True)
    (conf / "base" / "toy_bnn.yaml").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(code))
    yield [f"hydra.searchpath=[file://{conf}]", "base=toy_bnn", "data=cifar5_5"]
    forget_toy_base()


def forget_toy_base() -> None:
    """As a new process starts: the toy base's module not imported, so not registered."""
    BASES.pop("toy_bnn", None)
    sys.modules.pop("toy_bnn_base", None)


def test_a_base_defined_outside_the_package_pretrains_adapts_exports_and_predicts(toy_base, make_cfg, tmp_path):
    pretrain = make_cfg(*toy_base, "task=pretrain", "trainer.max_epochs=1", name="pretrain")
    assert pretrain.base.net._target_ == "toy_bnn_base.ToyBNN"
    task.run(pretrain)
    adapt = make_cfg(*toy_base, "adapter=udta", "trainer.max_epochs=1", name="adapt")
    metrics = task.run(adapt)
    assert 0.0 <= metrics["test_top1"] <= 1.0 and metrics["macs_binary"] > 0
    forget_toy_base()  # each task as its own command: export and predict import the base the config names
    out = tmp_path / "export"
    manifest = task.run(
        make_cfg(*toy_base, "task=export", f"export.adapter_run=[{adapt.paths.output_dir}]", f"export.dir={out}")
    )
    base_file, adapter_file = sorted(manifest["files"], key=lambda name: manifest["files"][name]["kind"] != "base")
    packed, header = read_packed_base(out / base_file)
    assert header["arch"] == "toy_bnn" and type(packed).__name__ == "ToyBNN"

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
    predictions = tmp_path / "predictions.json"
    forget_toy_base()
    task.run(
        make_cfg(
            *toy_base,
            "task=predict",
            f"base.file={out / base_file}",
            f"adapters=[{out / adapter_file}]",
            f"inputs={images}",
            "predict.top_k=2",
            f"predict.output={predictions}",
            name="predict",
        )
    )
    rows = next(iter(json.loads(predictions.read_text())["predictions"].values()))
    assert len(rows) == 3 and all(len(row) == 2 for row in rows.values())


@pytest.mark.parametrize(
    ("target", "message"),
    [("os.system", "is not a BaseNetwork subclass"), ("no_such_module.Net", "cannot be imported")],
)
def test_a_base_target_that_is_no_base_network_is_one_line(target, message, make_cfg):
    cfg = make_cfg(f"base.net._target_={target}")
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
