"""Scale-out: trainer configs (CPU, one GPU with mixed precision, several GPUs with ddp_spawn)
and Hydra launchers (joblib for parallel local jobs, submitit for SLURM). ``trainer=ddp`` runs here
as two CPU processes: the same spawn, pickling and gathering as on GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from bnn_adapt.run import task
from bnn_adapt.training.datasets import built_in, find
from tests.helpers.cli import REPO_ROOT, run_here, run_module

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


@pytest.mark.integration  # worker processes
def test_two_job_joblib_multirun_on_cpu(tmp_path):
    """A sweep run by the joblib launcher, two jobs at a time in worker processes. Four jobs, so that
    a worker runs a second one: Hydra restores its snapshot of the OmegaConf resolvers before each job,
    and our own (``${classes_tag:...}`` in base.checkpoint) must be in it."""
    sweep = tmp_path / "sweep"
    result = run_module(
        tmp_path,
        "bnn_adapt",
        "--multirun",
        "hydra/launcher=parallel",
        "+experiment=cifar80_20_udta",
        "summary_only=true",
        "reduction=prune",
        "reduction.rate=0.0,0.5,0.9,0.99",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert "error:" not in result.stderr
    sizes = [json.loads((sweep / str(job) / "summary.json").read_text())["adapter_fp32_params"] for job in range(4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


@pytest.mark.integration
def test_ddp_spawn_on_two_cpu_processes_reports_the_run(tmp_path):
    """trainer=ddp (ddp_spawn) trains in child processes; the run's statistics still reach metrics.json."""
    run_dir = tmp_path / "run"
    result = run_module(
        tmp_path,
        "bnn_adapt",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "base.width=0.1",
        "base.pretrain.epochs=1",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_run"] == 2 and len(metrics["history"]) == 2
    assert metrics["device"] == "cpu x 2" and metrics["test_top1"] is not None


def test_sync_batchnorm_on_cpu_processes_is_one_line(tmp_path):
    """torch's SyncBatchNorm runs on GPUs only: on CPU processes the run stops before training with one line
    (it used to fail inside each spawned worker). ``make gpu-check`` runs it on GPUs."""
    result = run_here(
        tmp_path,
        "bnn_adapt",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.sync_batchnorm=true",
        "base.width=0.1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode != 0 and "trainer.sync_batchnorm=true needs GPUs" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.rglob("*.pt"))  # stopped before pretraining its base


def test_every_dataset_spec_pickles():
    """ddp_spawn pickles the datamodule, and with it its dataset's spec, into every worker process."""
    specs = {name: find(name) for name in built_in()}
    assert len(specs) == 7 and pickle.loads(pickle.dumps(specs)).keys() == specs.keys()


@pytest.mark.parametrize(
    "overrides",
    [
        ("data=cifar5_5", "adapter=udta", "logger=[csv,tensorboard,mlflow,wandb]"),
        ("data=cifar5_5", "adapter=udta", "tap_cache.enabled=true"),
        ("data=cifar5_5", "adapter=serial", "reduction=prune", "memory=lean"),
        ("data=cifar5_5", "adapter=lora", "reduction=prune_iterative", "trainer.max_epochs=4"),
        ("data=cifar5_5", "adapter=bitfit", "base.bn=adapt"),
        ("data=digits5_5", "adapter=head_only"),  # its base is pretrained first: two fits
    ],
)
def test_what_ddp_spawn_sends_to_its_workers_pickles(make_cfg, pretrained_base, monkeypatch, overrides):
    """Everything ``trainer.fit`` hands Lightning's spawn launcher (the trainer with its callbacks and loggers,
    the module, the datamodule) pickles, for the strategies, reductions, memory modes, tap cache and trackers."""
    sent = []

    def fit(trainer, model, datamodule=None, ckpt_path=None):  # what the launcher pickles, instead of training
        sent.append(pickle.loads(pickle.dumps((trainer, model, datamodule))))

    monkeypatch.setattr(L.Trainer, "fit", fit)
    cfg = make_cfg(
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", *overrides
    )
    try:
        task.run(cfg)
    finally:  # the faked fit never reaches TrackerRecords.on_fit_end, which finishes the W&B run
        if any("wandb" in o for o in overrides):
            importlib.import_module("wandb").finish()
    assert len(sent) == (2 if "data=digits5_5" in overrides else 1) and all(t.world_size == 2 for t, _, _ in sent)


def test_ddp_slurm_takes_nodes_and_devices_from_the_launcher():
    cfg = composed(
        "hydra/launcher=slurm",
        "trainer=ddp_slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.gpus_per_node=4",
    )
    HydraConfig().set_config(cfg)  # what ${hydra:launcher.nodes} reads inside a job
    trainer = cfg.trainer
    assert (trainer.strategy, trainer.accelerator, trainer.num_nodes, trainer.devices) == ("ddp", "gpu", 2, 4)
    assert trainer.plugins[0]._target_.endswith("SLURMEnvironment") and trainer.sync_batchnorm is False


@pytest.mark.integration
def test_ddp_slurm_ranks_started_as_srun_would_train_together_and_rank_0_writes_the_run(tmp_path):
    """Two processes with the variables srun sets for one node and two tasks (what submitit starts for
    ``hydra.launcher.tasks_per_node=2``), each running the job: one DDP run over gloo. Rank 0 writes the
    run's files; rank 1 its own, under rank1/. Not a real cluster: srun and submitit's wrapper are left out."""
    base = tmp_path / "base.pt"
    tiny = (
        "base.width=0.1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.precision=32-true",
    )
    pretrained = run_module(
        tmp_path,
        "bnn_adapt",
        "task=pretrain",
        "trainer=cpu",
        *tiny,
        f"base.save_to={base}",
        f"hydra.run.dir={tmp_path / 'pretrain'}",
    )
    assert pretrained.returncode == 0, pretrained.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env.update(
        BNN_ADAPT_ROOT=str(tmp_path),
        OMP_NUM_THREADS="1",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_NODELIST="127.0.0.1",
        SLURM_JOB_NAME="bnn_adapt",
        SLURM_JOB_ID="4242",
        MASTER_PORT=str(port),
    )
    command = [
        sys.executable,
        "-m",
        "bnn_adapt",
        "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2",
        "trainer=ddp_slurm",
        "trainer.accelerator=cpu",
        *tiny,
        f"base.checkpoint={base}",
        f"hydra.run.dir={run_dir}",
    ]
    procs = [
        subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ours, other = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, run_dir / "rank1"))
    assert ours["status"] == other["status"] == "complete" and ours["device"] == "cpu x 2"
    assert ours["config"]["paths"]["output_dir"] == str(run_dir) and (run_dir / "adapter.safetensors").is_file()
    assert ours["test_top1"] == other["test_top1"]  # one DDP run: the metric is gathered over both ranks


@pytest.mark.integration
def test_two_job_submitit_local_multirun_writes_both_results(tmp_path):
    """``hydra/launcher=slurm``'s plugin (hydra-submitit-launcher), with submitit's local executor: every job
    of the sweep in a process of its own, as a SLURM job array would run them."""
    sweep = tmp_path / "sweep"
    result = run_module(
        tmp_path,
        "bnn_adapt",
        "--multirun",
        "hydra/launcher=submitit_local",
        "adapter=head_only,udta",
        "base.width=0.1",
        "base.pretrain.epochs=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    jobs = [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert [m["status"] for m in jobs] == ["complete", "complete"]
    assert [m["config"]["adapter"]["name"] for m in jobs] == ["head_only", "udta"]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit's own record of each job
