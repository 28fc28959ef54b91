"""Experiment trackers as config choices (``logger=tensorboard|wandb|mlflow``), each run offline with
its real package and read back with that tracker's own reader; how a multirun groups its runs; the
console (each line once, MACs in place of "Total FLOPs: 0"); a missing package; the config hash.

The packages come with the test extra (``pip install -e ".[test]"`` installs ``.[tracking]``);
without them these tests skip, saying which package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bnn_adapt.errors import ConfigError
from bnn_adapt.run import builders, task
from bnn_adapt.run.config import compose
from bnn_adapt.run.results import config_hash
from tests.helpers.config import compose_config

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALLED = [name for name in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(name)]
EXTRA = 'not installed: pip install -e ".[tracking]"'
NONE = f"tensorboard, mlflow and wandb {EXTRA}"


def needs(package: str) -> None:
    if package not in INSTALLED:
        pytest.skip(f"{package} {EXTRA}")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, data_dir, shared_base_dir, pretrained_base) -> tuple[dict, Path]:
    """One tiny UDTA adaptation logged to CSV and every installed tracker at once."""
    if not INSTALLED:
        pytest.skip(NONE)
    out = tmp_path_factory.mktemp("tracked") / "run"
    cfg = compose_config(
        ["data=cifar5_5", "adapter=udta", f"logger=[csv,{','.join(INSTALLED)}]"], out, data_dir, shared_base_dir
    )
    return task.run(cfg), out


def test_a_tracker_leaves_the_training_unchanged(tracked_run, tmp_path, data_dir, shared_base_dir):
    """Trackers only mirror a run (they are not hashed): the same config logged to CSV alone trains the same."""
    metrics, _ = tracked_run
    cfg = compose_config(["data=cifar5_5", "adapter=udta", "logger=csv"], tmp_path / "run", data_dir, shared_base_dir)
    plain = task.run(cfg)
    assert plain["history"] == metrics["history"] and plain["test_top1"] == metrics["test_top1"]


def epoch_accuracies(metrics: dict) -> list[float]:
    return [h["val/acc"] for h in metrics["history"]]


def test_tensorboard_event_files_hold_the_accuracy_of_every_epoch(tracked_run):
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    metrics, out = tracked_run
    events = EventAccumulator(str(out / "tensorboard" / out.name))  # a single run: <run dir>/tensorboard/<its name>
    events.Reload()
    accuracies = [e.value for e in events.Scalars("val/acc")]
    assert len(accuracies) == 3 and accuracies == pytest.approx(epoch_accuracies(metrics))
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(metrics["test_top1"])  # HParams view: final top-1
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["config/adapter/name"].string_value == "udta"
    assert hparams["summary/size_pct"].number_value == pytest.approx(metrics["size_pct"])
    assert hparams["summary/macs_binary"].number_value == metrics["macs_binary"]
    assert hparams["summary/introduced_fp32_params"].number_value == metrics["introduced_fp32_params"]


def test_mlflow_client_reads_the_metrics_back_from_the_local_store(tracked_run):
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    metrics, out = tracked_run
    client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")  # a single run: its store in its own directory
    experiment = client.get_experiment_by_name("bnn_adapt")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "val/acc"), key=lambda m: m.step)
    assert [m.value for m in history] == pytest.approx(epoch_accuracies(metrics))
    params = run.data.params
    assert params["config/adapter/name"] == "udta" and params["config/data/name"] == "cifar10"
    assert float(params["summary/size_pct"]) == pytest.approx(metrics["size_pct"])
    assert int(params["summary/base_bits"]) == metrics["base_bits"]
    assert int(params["summary/adapter_macs"]) == metrics["adapter_macs"]


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: a 7-byte header, then LevelDB-log-style records
    (crc32, length, type; 32 KiB blocks) holding protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending, pos = path.read_bytes(), 32768, [], b"", 7
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the rest of a block too small for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def of_kind(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def test_wandb_writes_its_offline_run_directory(tracked_run):
    needs("wandb")
    metrics, out = tracked_run
    (run_dir,) = (out / "wandb").glob("offline-run-*")  # offline: nothing was sent anywhere
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    (run,) = of_kind(records, "run")
    assert run.display_name == out.name and run.job_type == "adapt" and run.run_group == ""  # no sweep: no group
    config = {u.key: json.loads(u.value_json) for c in of_kind(records, "config") for u in c.update}
    assert config["config"]["adapter"]["name"] == "udta"
    assert config["summary"]["size_pct"] == pytest.approx(metrics["size_pct"])
    assert config["summary"]["binary_mac_share"] == pytest.approx(metrics["binary_mac_share"])
    # a key with a slash is stored split: nested_key ["val", "acc"]
    logged = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in of_kind(records, "history")
    ]
    assert [h["val/acc"] for h in logged if "val/acc" in h] == pytest.approx(epoch_accuracies(metrics))


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(BNN_ADAPT_ROOT=str(root), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "bnn_adapt", *args],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.integration  # the console of a real process
def test_a_multirun_groups_its_runs_and_the_console_prints_each_line_once(tmp_path, monkeypatch):
    """Two digits jobs (the first pretrains the base in a sub-run): one TensorBoard folder, one MLflow
    experiment and one W&B group for the sweep; Lightning's lines once each; our MACs, no FLOPs."""
    if not INSTALLED:
        pytest.skip(NONE)
    result = cli(
        tmp_path,
        "--multirun",
        "adapter=head_only,udta",
        f"logger=[csv,{','.join(INSTALLED)}]",
        "hydra.sweep.dir=${paths.log_dir}/sweeps/trackers",
        "base.width=0.1",
        "base.pretrain.epochs=1",
        "trainer.max_epochs=2",
        "data.limit_per_class=16",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "sweeps" / "trackers"
    runs = {"0", "0/base_pretrain", "1"}  # job directories relative to the sweep; job 0 pretrained the base

    console = result.stdout + result.stderr
    assert console.count("GPU available:") == 3, console[-3000:]  # one line per trainer, not two
    assert "Total FLOPs" not in console and "💡" not in console
    assert console.count("MACs per 32x32 image:") == 3  # our summary, once per trainer

    if "tensorboard" in INSTALLED:
        found = {str(p.parent.relative_to(sweep / "tensorboard")) for p in (sweep / "tensorboard").rglob("events.*")}
        assert found == runs
    if "mlflow" in INSTALLED:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the store the run asked for (run/tracking.py)

        client = MlflowClient(tracking_uri=f"file:{sweep / 'mlruns'}")
        experiment = client.get_experiment_by_name("sweeps/trackers")  # named after the sweep, under log_dir
        assert {r.info.run_name for r in client.search_runs([experiment.experiment_id])} == runs
    if "wandb" in INSTALLED:
        files = list((sweep / "wandb").glob("offline-run-*/run-*.wandb"))
        groups = [of_kind(wandb_records(f), "run")[0] for f in files]
        assert sorted(r.display_name for r in groups) == sorted(runs)
        assert {r.run_group for r in groups} == {"sweeps/trackers"}


def test_a_missing_tracker_package_is_one_line_naming_the_extra(make_cfg, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = make_cfg("logger=[csv,wandb]")
    with pytest.raises(ConfigError, match=r'^logger=wandb needs the wandb package: pip install -e "\.\[tracking\]"'):
        task.run(cfg)
    assert not Path(cfg.paths.output_dir).exists()  # stopped before any work


def test_lightnings_own_missing_package_error_names_the_extra_too(make_cfg, monkeypatch):
    monkeypatch.setattr("lightning.pytorch.loggers.mlflow._MLFLOW_AVAILABLE", False)
    with pytest.raises(ConfigError, match=r"^logger=mlflow needs the mlflow-skinny package: pip install"):
        builders.build_loggers(make_cfg("logger=mlflow"))


def test_trackers_leave_the_config_hash_alone():
    """A finished run is complete whichever trackers mirror it; the CSV log is one of its result files."""
    plain = config_hash(compose(["logger=csv"]))
    assert config_hash(compose(["logger=[csv,tensorboard,wandb,mlflow]"])) == plain
    assert config_hash(compose(["logger=none"])) != plain
