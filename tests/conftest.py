"""Shared fixtures: the real Hydra config, composed and shrunk for fast CPU runs.

In the style of the lightning-hydra-template: the project's one compose helper
(:func:`bnn_adapt.run.config.compose`, Hydra's compose API on ``conf/``), then
shrunk with ``open_dict`` (outputs, bases and data under ``tmp_path``, a tiny
network, a few batches) and registered with ``HydraConfig`` so that
``${hydra:...}`` interpolations resolve. Tests then call the real
:func:`bnn_adapt.run.task.run`.
"""

from __future__ import annotations

import copy
import os
import resource
import shutil

# Two shared cores: torch's default of one thread per core spins and thrashes
# as soon as anything else runs (a 0.05 s step became 0.8 s). Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests that run at 2 threads (issue 23): a thread waiting for the other sleeps instead of
# spinning, or on a loaded machine every barrier waits for a preempted spinner (one epoch at load
# average 13 on 2 cores: 116 s spinning, 36 s passive, 30 s at 1 thread). Results are the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from bnn_adapt.adapters.file import export_adapter  # noqa: E402
from bnn_adapt.deploy.packed_base import write_packed_base  # noqa: E402
from tests.helpers.cli import SEARCH  # noqa: E402
from tests.helpers.config import CIFAR_PER_CLASS, IMAGEFOLDER_CLASSES, compose_config  # noqa: E402
from tests.helpers.data import write_cifar10, write_imagefolder  # noqa: E402
from tests.helpers.models import CLASSES, PREPROCESS, adapted, make_base  # noqa: E402

torch.set_num_threads(1)

#: the file-size limit the session started with; tests/test_write_errors.py fills the disk by lowering it
FILE_SIZE_LIMIT = resource.getrlimit(resource.RLIMIT_FSIZE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Every test ends with the file-size limit lifted again, before pytest reports it: a test that filled the
    disk (failed or not) must not make pytest's own output (a log file) fail."""
    try:
        return (yield)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` holding generated CIFAR-10 (in cifar10/, the conf default) and an image folder."""
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root / "cifar10", n_per_class=CIFAR_PER_CLASS)
    write_imagefolder(root / "my_images", classes=IMAGEFOLDER_CLASSES, n_per_class=8, grayscale_some=True)
    return root


@pytest.fixture(scope="session")
def shared_base_dir(tmp_path_factory) -> Path:
    """``paths.base_dir`` shared by the session: the pretrained CIFAR base lands here."""
    return tmp_path_factory.mktemp("bases")


@pytest.fixture
def make_cfg(tmp_path, data_dir, shared_base_dir) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, name="run", base_dir=None, tiny=True)``: a composed, shrunk config.

    Outputs go to ``tmp_path/name``; bases are read from / written to the
    session's shared base folder unless ``base_dir`` is given.
    """

    def make(*overrides: str, name: str = "run", base_dir: Path | None = None, tiny: bool = True) -> DictConfig:
        return compose_config(overrides, tmp_path / name, data_dir, base_dir or shared_base_dir, tiny=tiny)

    return make


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory, data_dir, shared_base_dir) -> dict:
    """A tiny STE base pretrained on generated CIFAR-10 classes 0-4 (``task=pretrain``).

    Returns ``{"checkpoint": Path, "metrics": dict, "output_dir": Path}``. Its
    ``base.save_to`` is the default ``base.checkpoint`` of the ``cifar5_5``
    adaptation configs, so they find it without being told.
    """
    from bnn_adapt.run.task import run

    out = tmp_path_factory.mktemp("pretrain") / "run"
    cfg = compose_config(
        ["data=cifar5_5", "task=pretrain", "adapter=full_finetune", "optimizer.lr=1e-3", "trainer.max_epochs=3"],
        out,
        data_dir,
        shared_base_dir,
    )
    metrics = run(cfg)
    return {"checkpoint": Path(cfg.base.save_to), "metrics": metrics, "output_dir": out}


@pytest.fixture
def exported(tmp_path) -> dict:
    """A packed STE base and two adapters for it (udta, lora), with their trained-like models."""
    base, _ = make_base("ste")
    write_packed_base(base, tmp_path / "base.bnnpack")
    models, files = {}, {}
    for strategy in CLASSES:
        models[strategy] = adapted(strategy, base)
        files[strategy] = tmp_path / f"{strategy}.safetensors"
        export_adapter(
            models[strategy], files[strategy], reference_base=base, class_names=CLASSES[strategy], preprocess=PREPROCESS
        )
    return {"base": tmp_path / "base.bnnpack", "models": models, "files": files}


@pytest.fixture(scope="session")
def search_base(tmp_path_factory) -> Path:
    """The digits base that :data:`tests.helpers.cli.SEARCH` pretrains on the fly, pretrained once a session."""
    from bnn_adapt.run.builders import pretraining_config
    from bnn_adapt.run.task import run

    root = tmp_path_factory.mktemp("search_base")
    search = [o for o in SEARCH if not o.startswith("hparams_search=")]
    cfg = compose_config(search, root / "run", root / "data", root / "outputs" / "bases", tiny=False)
    run(pretraining_config(cfg))
    return Path(cfg.base.checkpoint)


@pytest.fixture
def search_root(tmp_path, search_base) -> Path:
    """``tmp_path`` as a search's ``BNN_ADAPT_ROOT`` whose digits base is already there (nothing pretrained)."""
    bases = tmp_path / "outputs" / "bases"
    bases.mkdir(parents=True)
    shutil.copy2(search_base, bases / search_base.name)
    return tmp_path


@pytest.fixture(scope="session")
def composed_once():
    """Each thesis-table job composed once a session (a copy each time): composing is what reading a table costs,
    and ``table_runs._compose`` is a pure function of its arguments (paths resolve when read, from the root)."""
    from bnn_adapt.thesis import table_runs

    compose_job, composed = table_runs._compose, {}

    def cached(sweep: str, overrides) -> DictConfig:
        key = (str(table_runs.SWEEPS_DIR), sweep, tuple(overrides))
        if key not in composed:
            composed[key] = compose_job(sweep, overrides)
        return copy.deepcopy(composed[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(table_runs, "_compose", cached)
        yield
