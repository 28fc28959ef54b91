"""The real config, composed and shrunk for fast CPU runs, every path pointed into a test's folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from bnn_adapt.run.config import compose

# What every test run shares: a tiny network, a few small batches, CPU, quiet.
TINY_OVERRIDES = (
    "base.width=0.1",
    "data.batch_size=16",
    "data.num_workers=0",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=5",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.log_every_n_steps=1",
    "base.precise_bn.batches=5",
)
# generated datasets: images per class (CIFAR-10: 5 target classes x 16 = 80 = 5 batches of 16)
CIFAR_PER_CLASS = 16
IMAGEFOLDER_CLASSES = ("cat", "dog", "3", "bird", "7")


def compose_config(
    overrides: Sequence[str],
    output_dir: Path,
    data_dir: Path,
    base_dir: Path,
    tiny: bool = True,
) -> DictConfig:
    """The real ``conf/config.yaml`` with ``overrides``, every path pointed into the test's folders."""
    cfg = compose([*(TINY_OVERRIDES if tiny else ()), *overrides], return_hydra_config=True)
    root = Path(output_dir).parent
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.log_dir = str(root / "outputs")
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.base_dir = str(base_dir)
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        if tiny:
            cfg.trainer.enable_progress_bar = False
            cfg.trainer.enable_model_summary = False
    HydraConfig().set_config(cfg)
    return cfg
