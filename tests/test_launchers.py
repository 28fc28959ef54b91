"""Scale-out: trainer configs (CPU, one GPU with mixed precision, several GPUs with ddp_spawn)
and Hydra launchers (joblib for parallel local jobs, submitit for SLURM)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.test_tables import run_module

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_trainer_configs():
    assert composed("trainer=cpu").trainer.accelerator == "cpu"
    gpu = composed("trainer=gpu").trainer
    assert (gpu.accelerator, gpu.devices, gpu.precision) == ("gpu", 1, "16-mixed")
    ddp = composed("trainer=ddp").trainer
    assert ddp.strategy == "ddp_spawn" and ddp.accelerator == "gpu"  # never plain ddp inside a multirun


def test_launcher_configs():
    parallel = composed("hydra/launcher=parallel").hydra.launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 2
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
    slurm = composed("hydra/launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1


def test_two_job_joblib_multirun_on_cpu(tmp_path):
    """A sweep run by the joblib launcher, two jobs at a time in worker processes. Four jobs, so that
    a worker runs a second one: Hydra restores its snapshot of the OmegaConf resolvers before each job,
    and our own (``${classes_tag:...}`` in base.checkpoint) must be in it."""
    sweep = tmp_path / "sweep"
    result = run_module(
        tmp_path, "bnn_adapt", "--multirun", "hydra/launcher=parallel", "+experiment=cifar80_20_udta",
        "summary_only=true", "reduction=prune", "reduction.rate=0.0,0.5,0.9,0.99", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert "error:" not in result.stderr
    sizes = [json.loads((sweep / str(job) / "summary.json").read_text())["adapter_fp32_params"] for job in range(4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


@pytest.mark.slow
def test_ddp_spawn_on_two_cpu_processes_reports_the_run(tmp_path):
    """trainer=ddp (ddp_spawn) trains in child processes; the run's statistics still reach metrics.json."""
    run_dir = tmp_path / "run"
    result = run_module(
        tmp_path, "bnn_adapt", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "base.width=0.1", "base.pretrain.epochs=1", "trainer.max_epochs=2",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert metrics["device"] == "cpu x 2" and metrics["test_top1"] is not None
