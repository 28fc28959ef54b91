"""The size-vs-accuracy Pareto search (hparams_search=size_vs_accuracy): two objectives through
Hydra's Optuna sweeper, SQLite storage that a second run continues, the front as CSV and plot."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from omegaconf import OmegaConf

from bnn_adapt.run.task import sweeper_value
from bnn_adapt.search.pareto import pareto_front
from tests.helpers.cli import run_here

# digits pretrain their base on the fly: no data to generate; smoke sizes, 2 quick epochs
SEARCH = (
    "+experiment=digits5_5",
    "+profile=smoke",
    "hparams_search=size_vs_accuracy",
    "base.pretrain.epochs=2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
)


def test_objectives_are_what_the_search_optimises():
    metrics = {"test_top1": 0.75, "size_pct": 3.5, "status": "complete"}
    assert sweeper_value(OmegaConf.create({}), metrics) is metrics
    assert sweeper_value(OmegaConf.create({"optimized_metrics": ["test_top1", "size_pct"]}), metrics) == (0.75, 3.5)
    assert sweeper_value(OmegaConf.create({"optimized_metrics": ["test_top1"]}), metrics) == 0.75
    failed = {"status": "failed", "error": "x"}
    assert sweeper_value(OmegaConf.create({"optimized_metrics": ["test_top1", "size_pct"]}), failed) is failed


def test_pareto_front_keeps_the_non_dominated_points():
    points = [
        {"name": "a", "val_top1": 0.9, "size_pct": 50.0},
        {"name": "b", "val_top1": 0.8, "size_pct": 5.0},
        {"name": "c", "val_top1": 0.7, "size_pct": 10.0},  # beaten by b on both
        {"name": "d", "val_top1": 0.9, "size_pct": 60.0},  # beaten by a on size
        {"name": "e", "val_top1": 0.5, "size_pct": 1.0},
    ]
    assert [p["name"] for p in pareto_front(points)] == ["e", "b", "a"]


def test_search_runs_stores_trials_in_sqlite_continues_and_plots(tmp_path, search_root):
    first = run_here(tmp_path, "bnn_adapt", *SEARCH, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "pareto" / "smoke" / "digits_ste_resnet_cifar_w0.25"
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    study = optuna.load_study(study_name="size_vs_accuracy", storage=storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert len(study.trials) == 2

    with (sweep_dir / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) >= 1
    stored = sorted(v for t in study.trials if t.values for v in t.values)  # objectives = the runs' metrics
    assert sorted(float(t[k]) for t in trials for k in ("val_top1", "size_pct")) == pytest.approx(stored)
    assert all(0 <= float(t["test_top1"]) <= 1 for t in trials)  # measured once per trial, reported beside
    for t in trials:  # adapter.bits is one of the searched dimensions, and the size counts real bits
        assert t["adapter"] in ("serial", "udta") and t["overrides"]
        assert f"adapter.bits={t['bits']}" in t["overrides"] and int(t["bits"]) in (32, 16, 8, 4, 2, 1)
        assert int(t["adapter_macs"]) > 0  # compute beside size and accuracy
    comparison = json.loads((sweep_dir / "comparison.json").read_text())["front_vs_own_32_bit_trials"]
    assert comparison["limit_pct"] == 5.0 and "hypervolume" in comparison
    with (sweep_dir / "pareto_front.csv").open() as f:
        front = list(csv.DictReader(f))
    assert 1 <= len(front) <= len(trials) and all(t["on_front"] == "True" for t in front)
    assert (sweep_dir / "pareto_front.png").stat().st_size > 1000

    # the same command again continues the stored study
    second = run_here(tmp_path, "bnn_adapt", *SEARCH, "hydra.sweeper.n_trials=1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(optuna.load_study(study_name="size_vs_accuracy", storage=storage).trials) == 3
