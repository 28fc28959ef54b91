"""Planning a reproduction (make reproduce-tables PLAN=1): on the smoke profile every run a table
needs is listed once (its base first), complete runs are recognised by their metrics.json, and the
time of the others comes from measured data -- finished runs of the same kind, else the bench's
epoch records -- never from a constant."""

from __future__ import annotations

import json

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from bnn_adapt.run.config import without_hydra_node
from bnn_adapt.run.results import dataset_identity, write_json
from bnn_adapt.thesis import plan, tables
from bnn_adapt.thesis.table_runs import TABLES, table_rows
from bnn_adapt.training.datasets import find

pytestmark = pytest.mark.usefixtures("composed_once")  # each thesis-table job composed once a session


def finish(job, epoch_time_s: float, epochs: int = 3) -> None:
    """What the task writes for a complete run of ``job`` (its config resolved as inside that job)."""
    HydraConfig.instance().set_config(job.cfg)  # hydra.runtime.output_dir: the job's run directory
    config = OmegaConf.to_container(without_hydra_node(job.cfg), resolve=True)
    write_json(
        job.run_dir / "metrics.json",
        {
            "status": "complete",
            "config_hash": job.config_hash,
            "epoch_time_s": epoch_time_s,
            "epochs_run": epochs,
            "device": "cpu",
            "config": config,
            "data": dataset_identity(without_hydra_node(job.cfg)),
        },
    )


def jobs(table_id: str) -> dict[str, object]:
    """The table's expected runs by run directory name (``row=finetune``)."""
    return {job.run_dir.name: job for row in table_rows(TABLES[table_id], "smoke") for job in row.jobs}


def by_row(table_plan: plan.TablePlan) -> dict[str, plan.PlannedRun]:
    return {r.run_dir.name: r for r in table_plan.runs}


@pytest.fixture
def smoke_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    for name in ("cifar10", "cifar100"):  # as the smoke profile reads them
        find(name).synthetic(tmp_path / "data" / "smoke" / name)
    return tmp_path


def test_the_plan_lists_every_run_recognises_complete_ones_and_estimates_from_measurements(
    smoke_root, capsys, monkeypatch
):
    no_bench = smoke_root / "no_bench.json"
    first = plan.plan_tables(["6.2", "6.1"], "smoke", bench_path=no_bench)
    serial_rows = [
        "row=serial_g1",
        "row=serial_g10",
        "row=serial_g20",
        "row=serial_stage3",
        "row=serial_stage2",
        "row=serial_stage1",
    ]
    # 6.2 lists its base (table 6.1's STE row) first; 6.1 then lists only its other row
    assert list(by_row(first[0])) == ["base=ste_resnet_cifar", "row=finetune", "row=head_only", *serial_rows]
    assert list(by_row(first[1])) == ["base=resnet_cifar"]
    assert all(r.status == "not run" and r.seconds is None and r.epochs == 3 for p in first for r in p.runs)

    finish(jobs("6.1")["base=ste_resnet_cifar"], epoch_time_s=2.0, epochs=3)
    finish(jobs("6.2")["row=serial_g1"], epoch_time_s=0.5)
    finish(jobs("6.2")["row=serial_g10"], epoch_time_s=0.75)
    runs = by_row(plan.plan_tables(["6.2", "6.1"], "smoke", bench_path=no_bench)[0])
    base = runs["base=ste_resnet_cifar"]
    assert base.done and base.seconds == pytest.approx(6.0) and base.source.startswith("measured")
    assert runs["row=serial_g1"].done and runs["row=serial_g1"].seconds == pytest.approx(1.5)
    for row in serial_rows[2:]:  # 3 epochs x the mean of the two finished serial runs
        assert not runs[row].done and runs[row].seconds == pytest.approx(3 * 0.625), row
        assert runs[row].source.startswith("like 2 finished run(s)")
    assert runs["row=finetune"].seconds is None and runs["row=head_only"].seconds is None  # nothing of their kind

    # runs of a kind on other data: their time per training image x this run's images (counted on disk)
    cifar100 = by_row(plan.plan_tables(["6.2", "6.3"], "smoke", bench_path=no_bench)[1])
    images = 4 * 16  # limit_train_batches=4 of 16 (the generated CIFAR-100 has more of the served classes)
    assert cifar100["experiment=cifar80_20_base"].seconds == pytest.approx(3 * 2.0 / images * images)  # 6.1's base
    g5 = cifar100["adapter.groups=5"]
    assert g5.seconds == pytest.approx(3 * 0.625 / images * images)
    assert g5.source.startswith("like 2 finished run(s) of its kind on other data (cpu): 9.77 ms per training image")

    # the bench's epoch record: seconds per training image x this run's images x (width ratio)^2 x epochs
    bench = smoke_root / "epochs.json"
    bench.write_text(
        json.dumps(
            [
                {
                    "kind": "epoch",
                    "model": "ste_resnet_cifar",
                    "strategy": "full_finetune",
                    "cache_taps": False,
                    "width": 0.1,
                    "train_images": 200,
                    "epoch_time_s": 4.0,
                    "images_per_s": 50.0,
                    "device": "cpu",
                }
            ]
        )
    )
    table_plan = plan.plan_tables(["6.2"], "smoke", bench_path=bench)[0]
    finetune = by_row(table_plan)["row=finetune"]
    images = 4 * 16  # 5 x 32 generated images of the target classes, limit_train_batches=4 of 16
    assert finetune.seconds == pytest.approx(3 * 4.0 / 200 * images * (0.25 / 0.1) ** 2)
    assert finetune.source.startswith("bench: full_finetune epoch record")
    assert table_plan.remaining_s == pytest.approx(finetune.seconds + 4 * 3 * 0.625)
    assert table_plan.unknown == 1  # head only

    monkeypatch.setattr(plan, "BENCH_EPOCHS", no_bench)  # the command line reads benchmarks/epochs.json
    assert tables.main(["--plan", "--profile", "smoke", "6.2"]) == 0
    out = capsys.readouterr().out
    assert "table 6.2: CIFAR-10 5-5: serial adapters -- 3 of 9 runs complete" in out
    assert "0:00:06" in out and "like 2 finished run(s) of its kind (cpu)" in out
    assert "to go and 2 runs without an estimate (so at least that)" in out
    assert not (smoke_root / "outputs" / "tables" / "smoke" / "table_6_2" / "row=finetune").exists()  # ran nothing
