"""Thesis tables: every sweep expresses its table's rows; a reduced smoke reproduction through
the real command line (sweeps, skipping of finished runs, rendering from the runs' files); missing
and failed rows marked; the full `make reproduce-tables PROFILE=smoke` (integration)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from bnn_adapt.adapters import Parallel
from bnn_adapt.bases import BASES, ResNet18, ResNet18CIFAR
from bnn_adapt.run.results import read_json_or_none, write_json
from bnn_adapt.thesis import tables
from bnn_adapt.thesis.synthetic import write_smoke_data
from bnn_adapt.thesis.table_runs import expand_sweep
from bnn_adapt.training.datamodule import ClassSplitDataModule
from tests.helpers.cli import REPO_ROOT, run_module

pytestmark = pytest.mark.usefixtures("composed_once")  # each thesis-table job composed once a session

# the thesis's rows per table (thesis ch. 6)
THESIS_ROWS = {
    "5.2": ["ReActNet-18", "ResNet-18, fp32 (torchvision)"],
    "6.1": ["STE BNN (BinaryNet ResNet-18, CIFAR)", "ResNet-18, fp32 (BinaryNet.pytorch CIFAR, 16/32/64 ch)"],
    "6.2": [
        "finetune",
        "head only",
        "serial stages 1,2,3 g=1",
        "serial stages 1,2,3 g=10",
        "serial stages 1,2,3 g=20",
        "serial stages 3",
        "serial stages 2",
        "serial stages 1",
    ],
    "6.3": [f"serial stages 1,2,3 g={g}" for g in (1, 2, 5, 10, 20)],
    "6.4": [f"udta head=concat prune {r}" for r in (0.0, 0.8, 0.9, 0.95, 0.99)],
    "6.5": ["head only", "finetune", *(f"udta head=concat g={g}" for g in ("channels", 20, 10, 5, 2, 1))],
    "6.6": [
        "finetune",
        *(f"udta head={h} prune {r}" for h in ("concat", "adapter") for r in (0.0, 0.8, 0.9, 0.95, 0.99)),
    ],
}
THESIS_ROWS["6.7"] = ["finetune", "head only", *THESIS_ROWS["6.6"][1:]]
# a tiny, quick version of the smoke profile for the reduced reproduction below
QUICK = ("trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")


def sweep(root: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    result = run_module(
        root, "bnn_adapt", "--multirun", "--config-dir", "sweeps", "--config-name", name, "profile=smoke", *overrides
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def markdown_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


# ------------------------------------------------------------------ the sweeps express the thesis rows


@pytest.mark.parametrize("table_id", [*THESIS_ROWS, "fashion", "fashion_bits", "fashion_bn"])
def test_each_table_sweep_expands_to_exactly_its_rows(table_id, tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    rows = tables.table_rows(tables.TABLES[table_id], "smoke")
    labels = [row.label for row in rows]
    if table_id == "fashion":
        assert len(rows) == 8 and all(len(row.jobs) == 3 for row in rows)  # 3 seeds each
        assert {"head only", "finetune", "bitfit"} <= set(labels) and any(lb.startswith("lora") for lb in labels)
    elif table_id == "fashion_bits":
        assert all(len(row.jobs) == 3 for row in rows)  # 3 seeds each
        widths = ("", " 8-bit", " 4-bit", " 2-bit", " 1-bit")
        assert labels == [f"{a}{w}" for a in ("serial stages 1,2,3 g=1", "udta head=concat g=1") for w in widths]
    elif table_id == "fashion_bn":  # each frozen-base strategy under the three base.bn modes, side by side
        assert all(len(row.jobs) == 3 for row in rows) and len(rows) == 21
        assert labels[:3] == [f"head only base.bn={mode}" for mode in ("frozen", "recalibrate", "adapt")]
        assert all(row.jobs[0].cfg.base.bn == row.label.rpartition("=")[2] for row in rows)
        assert all(row.jobs[0].cfg.base.epoch == "last" for row in rows)
    else:
        assert labels == THESIS_ROWS[table_id]
    run_dirs = [job.run_dir for row in rows for job in row.jobs]
    assert len(set(run_dirs)) == len(run_dirs), "two rows would share a run directory"
    assert all(d.parent == tmp_path / "outputs" / "tables" / "smoke" / tables.TABLES[table_id].sweep for d in run_dirs)
    for row in rows:
        for job in row.jobs:
            assert job.cfg.profile.name == "smoke" and job.cfg.trainer.max_epochs == 3
            assert job.status == "not run"


def test_full_profile_keeps_the_thesis_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    by_label = {row.label: row.jobs[0].cfg for row in tables.table_rows(tables.TABLES["6.5"], "full")}
    for c in by_label.values():
        assert (c.trainer.max_epochs, c.base.width, c.data.batch_size) == (75, 1.0, 64)
    assert by_label["finetune"].optimizer.lr == 1e-4 and by_label["udta head=concat g=10"].optimizer.lr == 1e-3
    assert all(c.scheduler is None for c in by_label.values())
    assert all(c.base.bn == "adapt" and c.base.epoch == "best" for c in by_label.values())  # the thesis's protocol
    stes = {r.label: r.jobs[0].cfg for r in tables.table_rows(tables.TABLES["6.1"], "full")}
    (pretrain,) = [c for label, c in stes.items() if "STE" in label]
    # table 6.1: CIFAR-10 classes 0-4, 400 epochs: the very base table 6.2 adapts
    assert pretrain.trainer.max_epochs == 400 and pretrain.task == "pretrain" and pretrain.data.name == "cifar10"
    (adapt,) = [r.jobs[0].cfg for r in tables.table_rows(tables.TABLES["6.2"], "full") if r.label == "head only"]
    assert pretrain.base.save_to == adapt.base.checkpoint
    (cifar100,) = [j.cfg for r in tables.table_rows(tables.TABLES["6.5"], "full")[:1] for j in r.jobs]
    bases = expand_sweep("bases", ["profile=full"])
    assert ["experiment=cifar80_20_base", "profile=full"] in [sorted(b) for b in bases]
    assert tables.TABLES["6.5"].needs == ("bases:experiment=cifar80_20_base",)
    assert cifar100.base.checkpoint.endswith("ste_resnet_cifar_thesis_w1.0_cifar100_20-99.pt")


# ------------------------------------------------------------------ generated data and the ResNet-18 reference


def test_smoke_data_is_read_by_the_real_readers(tmp_path):
    write_smoke_data(tmp_path)
    for name, folder, classes in (("flowers102", "flowers102", 102), ("pets", "pets", 37)):
        dm = ClassSplitDataModule(name, root=str(tmp_path / folder), image_size=64)
        dm.setup()
        assert dm.num_classes == classes and len(dm.eval_set) >= classes
        image, label = dm.train_set[0]
        assert image.shape == (3, 64, 64) and 0 <= label < classes
    dm = ClassSplitDataModule(
        "cifar100", root=str(tmp_path / "cifar100"), base_classes=list(range(20, 100)), split="base"
    )
    dm.setup()
    assert dm.num_classes == 80
    assert (tmp_path / "reactnet18" / "model_best.pth.tar").is_file()


def torchvision_names(key: str) -> str:
    """Our ResNet-18's state-dict key -> torchvision's (stem.conv1 -> conv1, stages.0 -> layer1, classifier -> fc)."""
    if key.startswith("stem."):
        return key[len("stem.") :]
    if key.startswith("stages."):
        _, stage, rest = key.split(".", 2)
        return f"layer{int(stage) + 1}.{rest}"
    return key.replace("classifier.", "fc.", 1)


def test_resnet18_loads_torchvisions_weights_strictly_and_computes_the_same():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    with torch.no_grad():  # BN statistics away from (0, 1), so that they must land in the right layer
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    ours = ResNet18().eval()
    theirs = reference.state_dict()
    ours.load_state_dict({k: theirs[torchvision_names(k)] for k in ours.state_dict()}, strict=True)
    assert sorted(torchvision_names(k) for k in ours.state_dict()) == sorted(theirs)  # nothing left over
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    # the same ops in the same order: identical on x86 CPUs (measured); a mapping or structure error moves
    # logits by O(1), so allow only rounding in case another platform's pooling sums in another order
    assert torch.allclose(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert BASES["resnet18"] is ResNet18 and BASES["resnet18_cifar"] is ResNet18CIFAR
    net = ResNet18CIFAR(num_classes=80, width=0.125)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 80)
    adapted = Parallel(net, num_classes=20, head="concat", groups="channels")
    assert adapted(torch.randn(2, 3, 32, 32)).shape == (2, 20)


# ------------------------------------------------------------------ a reduced smoke reproduction, real CLI


@pytest.mark.integration  # the smoke profile through the command line: many runs
def test_reduced_smoke_reproduction_renders_tables_and_skips_finished_runs(tmp_path):
    root = tmp_path
    result = run_module(root, "bnn_adapt.thesis.synthetic")
    assert result.returncode == 0, result.stderr[-2000:]
    sweep(root, "table_6_1", "base=ste_resnet_cifar", *QUICK)
    base = root / "outputs" / "bases" / "smoke" / "ste_resnet_cifar_thesis_w0.25_cifar10_0-4.pt"
    assert base.is_file(), "table 6.1's STE row did not write the base table 6.2 reads"
    assert base.with_name(base.stem + "_best.pt").is_file(), "nor its best-test-accuracy epoch (the thesis's protocol)"
    sweep(root, "table_6_2", "row=head_only,serial_g10", *QUICK)
    sweep(root, "table_5_2")

    out = root / "results"
    # the renderer is given the overrides the sweep ran with: they name the run directories
    result = run_module(
        root,
        "bnn_adapt.thesis.tables",
        "--profile",
        "smoke",
        "--out",
        str(out),
        "6.2",
        *(f"--override={o}" for o in QUICK),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "table 6.2: 2 of 8 runs complete" in result.stdout
    result = run_module(root, "bnn_adapt.thesis.tables", "--profile", "smoke", "--out", str(out), "5.2")
    assert "table 5.2: 2 of 2 runs complete" in result.stdout, result.stderr[-3000:]

    md = (out / "table_6_2.md").read_text()
    assert md.startswith("# Table 6.2")
    assert "profile smoke" in md and "epochs 2" in md and "seed 42" in md and "base.bn adapt" in md
    assert "protocol thesis" in md and "base.epoch best" in md
    assert "device cpu" in md
    rows = {r[0]: r for r in markdown_rows(out / "table_6_2.md")}
    assert list(rows) == THESIS_ROWS["6.2"]
    for label, cells in rows.items():
        if label in ("head only", "serial stages 1,2,3 g=10"):
            assert cells[-1] == "complete" and 0.0 <= float(cells[1]) <= 100.0
        else:
            assert cells[-1] == "not run" and cells[1] == "-"
        assert cells[2] == {"finetune": "96.06", "head only": "74.44", "serial stages 1,2,3 g=10": "83.56"}.get(
            label, cells[2]
        )  # the thesis's printed top-1 beside ours
    with (out / "table_6_2.csv").open() as f:
        records = list(csv.DictReader(f))
    assert [r["strategy"] for r in records] == THESIS_ROWS["6.2"]
    head = next(r for r in records if r["strategy"] == "head only")
    metrics = read_json_or_none(Path(head["run_dirs"]) / "metrics.json")
    assert float(head["top-1 %"]) == 100 * metrics["test_top1"]  # the number comes from the run's own file
    ours = metrics["introduced_fp32_params"] + metrics["introduced_binary_params"]
    assert int(head["weights introduced (ours)"]) == ours and int(head["weights introduced (thesis conv.)"]) == 0
    serial = next(r for r in records if r["strategy"] == "serial stages 1,2,3 g=10")
    macs = read_json_or_none(Path(serial["run_dirs"]) / "metrics.json")["adapter_macs"]
    assert int(serial["adapter MACs"]) == macs > 0 and int(head["adapter MACs"]) == 0
    for name in ("table_6_2_test_accuracy.png", "table_6_2_train_loss.png", "accuracy_vs_weights.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "claims.md").read_text().startswith("# The thesis's conclusions, checked against the runs")

    counts = {r[0]: r for r in markdown_rows(out / "table_5_2.md")}
    assert counts["ReActNet-18"][1:3] == ["718,952", "10,985,472"]  # full width whatever the profile
    assert counts["ResNet-18, fp32 (torchvision)"][1:3] == ["11,689,512", "0"]

    finished = Path(head["run_dirs"])
    assert finished.name == "row=head_only," + ",".join(sorted(QUICK))  # the row's own overrides name its directory
    before = (finished / "metrics.json").stat().st_mtime_ns
    again = sweep(root, "table_6_2", "row=head_only", *QUICK)
    assert "already complete" in again.stdout
    assert (finished / "metrics.json").stat().st_mtime_ns == before


def test_failed_unfinished_and_stale_rows_are_marked(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    # table 6.4 and the table its speed-up refers to: the figures and claims over every table compose hundreds of jobs
    monkeypatch.setattr(tables, "TABLES", {t: tables.TABLES[t] for t in ("6.4", "6.5")})
    rows = tables.table_rows(tables.TABLES["6.4"], "smoke")
    failed, unfinished, stale = (rows[i].jobs[0].run_dir for i in (1, 2, 3))
    write_json(failed / "metrics.json", {"status": "failed", "error": "CheckpointError: no base"})
    unfinished.mkdir(parents=True)
    write_json(stale / "metrics.json", {"status": "complete", "config_hash": "another", "test_top1": 0.5})
    rendered = tables.render_tables(["6.4"], "smoke", tmp_path / "results")
    table = markdown_rows(tmp_path / "results" / "table_6_4.md")
    assert [r[-1] for r in table] == ["not run", "failed: CheckpointError: no base", "incomplete", "stale", "not run"]
    assert table[3][1] == "50.00"  # a stale run's numbers are shown, marked
    assert "0 of 5 runs complete, 1 stale. Sweep:" in rendered[0].markdown
    assert "the sweep definition (no run has finished)" in rendered[0].markdown


# ------------------------------------------------------------------ the whole thing


@pytest.mark.integration
@pytest.mark.timeout(3600)  # about 5 minutes on 2 CPU cores; much more when they are shared
def test_make_reproduce_tables_smoke_end_to_end(tmp_path):
    """`make reproduce-tables PROFILE=smoke`: every table and figure, every row complete."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(BNN_ADAPT_ROOT=str(tmp_path), OMP_NUM_THREADS="1")
    out = tmp_path / "results"
    result = subprocess.run(
        [
            "make",
            "-o",
            ".venv/.installed",
            "reproduce-tables",
            "PROFILE=smoke",
            f"RESULTS={out}",
            f"PY={sys.executable}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for table in tables.THESIS_TABLES:
        rows = markdown_rows(out / f"{table.stem}.md")
        assert [r[0] for r in rows] == THESIS_ROWS[table.id]
        assert all(r[-1] == "complete" for r in rows), (table.id, [r[-1] for r in rows])
        assert (out / f"{table.stem}.csv").is_file()
        if table.kind != "counts":
            for figure in ("test_accuracy", "train_loss"):
                assert (out / f"{table.stem}_{figure}.png").is_file()
    assert (out / "accuracy_vs_weights.png").is_file()
    claims = (out / "claims.md").read_text()
    assert claims.count("| 6.") >= 5 * 6  # every claim, every thesis adaptation table
    header = (out / "table_6_5.md").read_text()
    assert "| thesis top-1 % | Δ top-1 |" in header and "| thesis % | Δ % |" in header
