"""The thesis's values beside ours in every table, and the claims report, rendered from runs' own
``metrics.json`` files (written here with chosen numbers, so every cell is known)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import tomllib
from omegaconf import OmegaConf

from bnn_adapt.run.results import write_json
from bnn_adapt.thesis import tables
from bnn_adapt.thesis.table_runs import TABLES, Job, table_rows
from bnn_adapt.thesis.values import THESIS_CSV, UNKNOWN, thesis_values

pytestmark = pytest.mark.usefixtures("composed_once")  # each thesis-table job composed once a session

REPO_ROOT = Path(__file__).resolve().parents[1]


def markdown_rows(path: Path) -> dict[str, dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    return {r[0]: dict(zip(header, r, strict=True)) for r in rows}


def finish(
    job: Job,
    strategy: str,
    top1: float,
    epoch_time: float,
    weights: tuple[int, int] = (0, 0),
    size: float = 0.0,
    accs: list[float] | None = None,
    epochs: int = 75,
) -> None:
    """A complete run of ``job`` with these numbers, as the task writes it."""
    config = OmegaConf.to_container(job.cfg, resolve=False)
    config.pop("hydra")
    config["trainer"]["max_epochs"] = epochs
    accs = accs or [top1] * 3
    write_json(
        job.run_dir / "metrics.json",
        {
            "status": "complete",
            "config_hash": job.config_hash,
            "strategy": strategy,
            "test_top1": top1,
            "best_test_top1": max(accs),
            "epoch_time_s": epoch_time,
            "history": [{"epoch": i, "val/acc": a} for i, a in enumerate(accs)],
            "introduced_fp32_params": weights[0] + 10,
            "introduced_binary_params": weights[1] + 405,
            "size_pct": size + 1,
            "thesis": {"introduced_fp32_params": weights[0], "introduced_binary_params": weights[1], "size_pct": size},
            "config": config,
        },
    )


def test_thesis_values_ship_with_the_package_and_every_mapped_row_exists():
    assert THESIS_CSV.is_file() and "Adapters in Low-Precision Neural Networks" in THESIS_CSV.read_text()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "thesis_results.csv" in pyproject["tool"]["setuptools"]["package-data"]["bnn_adapt.thesis"]
    assert thesis_values()[("6.5", "udta_concat_g1")]["size_pct"] == 123.0
    assert thesis_values()[("6.2", "finetune")]["relative_speedup"] is None  # "-" in the thesis
    printed_tables = {t for t, _ in thesis_values()}
    assert printed_tables == {"6.2", "6.5", "6.6", "6.7"}
    for table in TABLES.values():
        if not table.thesis:
            assert not table.thesis_rows
            continue
        assert bool(table.thesis_rows) == (table.id in printed_tables)  # the others are images in the thesis
        if table.thesis_rows:  # every row of the sweep has its thesis row, and it exists
            keys = [row.key for row in table_rows(table, "smoke")]
            assert sorted(keys) == sorted(table.thesis_rows)
            assert all((table.id, name) in thesis_values() for name in table.thesis_rows.values())
            assert len(set(table.thesis_rows.values())) == len(table.thesis_rows)  # one thesis row each


def test_each_row_shows_ours_beside_the_thesis_with_the_difference(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    # the tables rendered here: the claims and figures over every table compose hundreds of jobs
    monkeypatch.setattr(tables, "TABLES", {t: TABLES[t] for t in ("6.2", "6.4", "6.5")})
    rows = {row.label: row.jobs[0] for row in table_rows(TABLES["6.5"], "smoke")}
    finish(rows["finetune"], "full_finetune", 0.75, 10.0, (6_280, 4_334_980), 100.0)
    finish(rows["udta head=concat g=1"], "udta", 0.764, 7.0, (174_160, 6_410), 123.00713)
    finish(rows["head only"], "head_only", 0.654, 5.0)
    out = tmp_path / "results"
    tables.render_tables(["6.5", "6.4"], "smoke", out)
    cells = markdown_rows(out / "table_6_5.md")
    g1 = cells["udta head=concat g=1"]
    assert (g1["top-1 %"], g1["thesis top-1 %"], g1["Δ top-1"]) == ("76.40", "76.40", "+0.00")
    assert (g1["gap to finetune (points)"], g1["thesis gap"]) == ("+1.40", "+1.40")
    assert (g1["weights introduced (thesis conv.)"], g1["thesis weights"], g1["Δ weights"]) == ("180,570",) * 2 + (
        "+0",
    )
    assert (g1["% base memory (thesis conv.)"], g1["thesis %"], g1["Δ %"]) == ("123.01", "123.0", "+0.01")
    assert (g1["speed-up 2 - t/t_ft"], g1["thesis speed-up"], g1["speed-up t_ft/t"]) == ("1.30", "1.31", "1.43")
    assert g1["weights introduced (ours)"] == "180,985" and g1["% base memory (ours)"] == "124.007"  # ours apart
    head = cells["head only"]
    assert (head["top-1 %"], head["thesis top-1 %"], head["Δ top-1"], head["gap to finetune (points)"]) == (
        "65.40",
        "65.40",
        "+0.00",
        "-9.60",
    )
    finetune = cells["finetune"]
    assert finetune["thesis weights"] == "not printed" and finetune["Δ weights"] == "-"
    # rows in the thesis's order, each beside its own thesis row (the table as the thesis printed it)
    assert [c["thesis top-1 %"] for c in cells.values()] == [
        "65.40",
        "75.00",
        "70.20",
        "72.20",
        "73.20",
        "74.50",
        "75.80",
        "76.40",
    ]
    unrun = cells["udta head=concat g=20"]  # not run: the thesis's values still show
    assert (unrun["top-1 %"], unrun["thesis top-1 %"], unrun["thesis %"], unrun["status"]) == (
        "-",
        "72.20",
        "11.4",
        "not run",
    )
    with (out / "table_6_5.csv").open() as f:
        record = next(r for r in csv.DictReader(f) if r["strategy"] == "udta head=concat g=1")
    assert float(record["Δ %"]) == pytest.approx(0.00713) and float(record["thesis top-1 %"]) == 76.4
    md = (out / "table_6_5.md").read_text()
    assert "protocol thesis" in md and "base.epoch best" in md and "base.bn adapt" in md
    assert "rounds down" in md  # the table's own note about the thesis's bookkeeping

    # table 6.4 is an image in the thesis: each thesis cell says so; its gaps use table 6.5's finetuning
    cells = markdown_rows(out / "table_6_4.md")
    assert {c["thesis top-1 %"] for c in cells.values()} == {UNKNOWN}
    assert "table 6.5's finetuning" in (out / "table_6_4.md").read_text()

    # the claims of every table, in one order whichever table was rendered last
    claims_then = (out / "claims.md").read_text()
    tables.render_tables(["6.2"], "smoke", out)
    assert (out / "claims.md").read_text() == claims_then


def test_pretraining_and_count_tables_say_the_thesis_values_are_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    for table_id in ("6.1", "5.2"):
        markdown = tables.render(TABLES[table_id], table_rows(TABLES[table_id], "smoke")).markdown
        (tmp_path / "t.md").write_text(markdown)
        assert {c["thesis's values"] for c in markdown_rows(tmp_path / "t.md").values()} == {UNKNOWN}


def test_clean_protocol_renders_its_own_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    given = {}
    monkeypatch.setattr(tables, "render_tables", lambda ids, profile, out, overrides: given.update(o=overrides) or [])
    assert tables.main(["--profile", "smoke", "--protocol", "clean", "6.5"]) == 0
    assert given["o"] == ["protocol=clean"]  # the clean protocol's runs are in directories of their own
    (job,) = table_rows(TABLES["6.5"], "smoke", given["o"])[0].jobs
    finish(job, "head_only", 0.5, 5.0)
    md = tables.render(TABLES["6.5"], table_rows(TABLES["6.5"], "smoke", given["o"])).markdown
    assert "protocol clean" in md and "base.bn frozen" in md and "profile=smoke protocol=clean`" in md
    assert "| head only | 50.00 | 65.40 | -15.40 |" in md


# ------------------------------------------------------------------ the claims report


def claims(path: Path) -> dict[str, dict[str, str]]:
    """{claim section: {table: verdict}} and the summary under key 'summary'."""
    found, section = {"summary": {}}, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].rsplit(":", 1)[0]
            found[section] = {}
        elif line.startswith("| ") and not line.startswith(("| table", "| claim", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if section is None:
                found["summary"][cells[0]] = cells[1]
            else:
                found[section][cells[0]] = cells[1] + " | " + cells[2]
    return found


def test_claims_are_checked_against_the_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_ADAPT_ROOT", str(tmp_path))
    rows = {row.label: row.jobs[0] for row in table_rows(TABLES["6.5"], "smoke")}
    finish(rows["finetune"], "full_finetune", 0.75, 10.0, (6_280, 4_334_980), 100.0)
    finish(rows["head only"], "head_only", 0.60, 5.0)
    # top-1 % = 42 + 3 ln(weights) exactly: slope 3, R² 1
    for label, weights, time in (("channels", 8_560, 7.0), (20, 16_080, 6.5), (10, 24_400, 6.8), (1, 174_160, 8.0)):
        top1 = (42 + 3 * math.log(weights + 6_410)) / 100
        size = {8_560: 6.2, 16_080: 9.5, 24_400: 17.4, 174_160: 123.0}[weights]
        finish(
            rows[f"udta head=concat g={label}"],
            "udta",
            top1,
            time,
            (weights, 6_410),
            size,
            accs=[0.6 * top1, 0.96 * top1, *[top1] * 73],
        )  # 95 % of the final top-1 at epoch 2
    checked = [(TABLES["6.5"], table_rows(TABLES["6.5"], "smoke")), (TABLES["6.2"], table_rows(TABLES["6.2"], "smoke"))]
    tables.write_claims(checked, tmp_path / "claims.md")
    found = claims(tmp_path / "claims.md")
    assert found["summary"]["Adapters come within 1-5 points of finetuning"] == "holds"
    assert found["Adapters come within 1-5 points of finetuning"]["6.5"].startswith("holds | finetuning 75.00 %")
    small = found["An adapter of 8-11 % of the base's memory costs 2.5-4 points"]["6.5"]
    assert small.startswith("holds | udta head=concat g=20 (9.5 %): +2.94 points below finetuning")  # 75 - 72.06
    fit = found["Accuracy grows with log(weights introduced)"]["6.5"]
    assert fit.startswith("holds | 4 adapters: top-1 % = 42.00 + 3.000 ln(weights)") and "R² = 1.000" in fit
    assert found["UDTA with groups reaches its best within about 10 epochs"]["6.5"].startswith("holds | epoch reaching")
    speed = found["Adapter epochs are 1.3-1.45x faster than finetuning (relative speed-up 2 - t/t_ft)"]["6.5"]
    assert speed == "holds | 4 adapters: 1.20 .. 1.35, median 1.31"  # 2 - 8/10 .. 2 - 6.5/10
    assert found["Adapters come within 1-5 points of finetuning"]["6.2"].startswith("not enough runs")
    assert found["summary"]["Accuracy grows with log(weights introduced)"] == "holds"

    # a table where they fail: adapters far below finetuning, slow to converge, no faster
    rows = {row.label: row.jobs[0] for row in table_rows(TABLES["6.2"], "smoke")}
    finish(rows["finetune"], "full_finetune", 0.96, 10.0, (6_250, 4_330_165), 100.0)
    late = [0.1] * 30 + [0.8] * 45
    for label, weights, top1 in (
        ("serial stages 1,2,3 g=1", 136_640, 0.80),
        ("serial stages 1,2,3 g=10", 15_680, 0.82),
        ("serial stages 3", 103_680, 0.70),
    ):
        finish(rows[label], "serial", top1, 9.9, (weights, 0), 10.0, accs=[*late[:-1], top1])
    checked[1] = (TABLES["6.2"], table_rows(TABLES["6.2"], "smoke"))
    tables.write_claims(checked, tmp_path / "claims.md")
    found = claims(tmp_path / "claims.md")
    assert found["Adapters come within 1-5 points of finetuning"]["6.2"].startswith("does not hold")
    assert found["summary"]["Adapters come within 1-5 points of finetuning"] == "does not hold"
    assert found["An adapter of 8-11 % of the base's memory costs 2.5-4 points"]["6.2"].startswith("does not hold")
    assert found["Accuracy grows with log(weights introduced)"]["6.2"].startswith("does not hold")
    assert found["Adapter epochs are 1.3-1.45x faster than finetuning (relative speed-up 2 - t/t_ft)"]["6.2"] == (
        "does not hold | 3 adapters: 1.01 .. 1.01, median 1.01"
    )
    assert found["summary"]["UDTA with groups reaches its best within about 10 epochs"] == "holds"  # 6.2 has no UDTA

    # sizes within 3x of each other (one adapter at several bit widths): no trend to fit, however good the line
    rows = {row.label: row.jobs[0] for row in table_rows(TABLES["6.2"], "smoke")}
    for label, weights in (
        ("serial stages 1,2,3 g=1", 9_000),
        ("serial stages 1,2,3 g=10", 10_000),
        ("serial stages 3", 13_000),
    ):
        finish(rows[label], "serial", (42 + 3 * math.log(weights)) / 100, 9.9, (weights, 0), 10.0)
    checked[1] = (TABLES["6.2"], table_rows(TABLES["6.2"], "smoke"))
    tables.write_claims(checked, tmp_path / "claims.md")
    narrow = claims(tmp_path / "claims.md")["Accuracy grows with log(weights introduced)"]["6.2"]
    assert narrow == "not enough runs | 3 adapters whose weights introduced span 1.44x (3x needed)"
