"""Experiment trackers (``logger=tensorboard|wandb|mlflow``, alone or with ``csv``): where they
write, how a sweep groups its runs, and what a run records in them.

Each tracker is a Lightning logger configured in ``conf/logger/`` and built by
:func:`bnn_adapt.run.builders.make_trainer`; all of them are offline by default
(TensorBoard event files, W&B in offline mode, an MLflow file store). In a
multirun the runs of one sweep share a place: one TensorBoard folder
(``<sweep dir>/tensorboard/<run>``), one MLflow store and experiment named after
the sweep (``<sweep dir>/mlruns``), one W&B group; a single run keeps everything
in its own directory. ``${tracking:dir}``, ``${tracking:run}`` and
``${tracking:group,DEFAULT}`` in the logger configs say which
(:func:`bnn_adapt.run.config.tracking_location`).

Every tracker gets the resolved config and the run's counts (size %, parameters,
bits, MACs) as hyperparameters when fitting starts (:class:`TrackerRecords`);
TensorBoard's ``hp_metric`` becomes the final top-1, so its HParams view compares
the runs of a sweep. The CSV log stays what it was: per-step and per-epoch metrics.
"""

from __future__ import annotations

import importlib.util
import os

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from bnn_adapt.errors import ConfigError
from bnn_adapt.run.record import RunRecord
from bnn_adapt.training.precise_bn import PRECISE_KEY

#: the package each tracker needs, all installed by the ``tracking`` extra
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
#: the modules a Lightning logger class needs (any one of them)
NEEDS = {"TensorBoardLogger": ("tensorboard", "tensorboardX"), "WandbLogger": ("wandb",), "MLFlowLogger": ("mlflow",)}
INSTALL = 'pip install -e ".[tracking]"'


def logger_configs(cfg: DictConfig) -> dict:
    """``logger.<name>`` nodes that build a logger (``logger=none``: none)."""
    return {name: node for name, node in (cfg.get("logger") or {}).items() if node is not None}


def allow_mlflow_file_store(node: DictConfig) -> None:
    """MLflow 3 keeps its file store only on request (``MLFLOW_ALLOW_FILE_STORE``); we request it
    for a ``file:`` tracking URI: plain folders need no server or database, and the runs of a
    parallel sweep write their own folders instead of contending for one SQLite file."""
    uri = str(node.get("tracking_uri") or "") if str(node.get("_target_", "")).endswith("MLFlowLogger") else ""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def missing_package(name: str, cause: BaseException | None = None) -> str:
    """The one line shown when a tracker's package is not installed."""
    package = PACKAGES.get(name)
    what = f"the {package} package" if package else f"a package that is missing ({cause})"
    return f"logger={name} needs {what}: {INSTALL} installs it (TensorBoard, W&B and MLflow)"


def check_installed(cfg: DictConfig) -> None:
    """Raise the one-line error of :func:`missing_package` for a configured logger whose package is
    missing, before any work starts (Lightning's loggers check when they are built)."""
    for name, node in logger_configs(cfg).items():
        target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        modules = NEEDS.get(target, ())
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(missing_package(name))


def run_hyperparameters(cfg: DictConfig, counts: RunRecord) -> dict:
    """What a tracker records of a run: the resolved config and its scalar counts."""
    scalars = {k: v for k, v in counts.to_dict().items() if isinstance(v, (int, float, str, bool))}
    return {"config": OmegaConf.to_container(cfg, resolve=True), "summary": scalars}


class TrackerRecords(L.Callback):
    """Hyperparameters to every tracker when fitting starts; TensorBoard's ``hp_metric`` = the
    final top-1 when it ends; each W&B run finished so that the next run in this process
    (a sweep's next job, the base pretraining before an adaptation) starts its own."""

    def __init__(self, hyperparameters: dict):
        self.hyperparameters = hyperparameters

    @staticmethod
    def trackers(trainer) -> list:
        return [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]

    def on_fit_start(self, trainer, pl_module) -> None:
        for tracker in self.trackers(trainer):
            tracker.log_hyperparams(self.hyperparameters)

    def on_fit_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics  # with precise BN after training: the base as saved
        top1 = metrics.get(PRECISE_KEY, metrics.get("val/acc"))
        if top1 is None:
            return
        for tracker in self.trackers(trainer):
            if isinstance(tracker, TensorBoardLogger):
                tracker.log_metrics({"hp_metric": float(top1)}, step=trainer.global_step)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._finish_wandb(trainer, exit_code=0)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._finish_wandb(trainer, exit_code=1)

    def _finish_wandb(self, trainer, exit_code: int) -> None:
        for tracker in self.trackers(trainer):
            # ``_experiment``: the ``experiment`` property would start a run where none was started
            if isinstance(tracker, WandbLogger) and tracker._experiment is not None and trainer.is_global_zero:
                tracker._experiment.finish(exit_code=exit_code)
                tracker._experiment = None
