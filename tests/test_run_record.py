"""The run record: what a run writes to metrics.json reads back as it was written, and a file that is no
record is one line for a reader that must have one, and "not complete" for one that looks for finished runs."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from bnn_adapt import report
from bnn_adapt.run.record import RecordError, RunRecord, completed
from bnn_adapt.run.task import sweeper_value


def test_a_runs_record_reads_back_as_written(pretrained_base):
    path = pretrained_base["output_dir"] / "metrics.json"
    written = json.loads(path.read_text())
    record = RunRecord.from_json(path)
    assert record.to_dict() == written
    assert record.data.location == written["data"]["location"]
    assert record.environment.threads == written["environment"]["threads"]
    assert record.run_dir == path.parent
    assert pretrained_base["metrics"] == written  # what the task returns to Hydra is the record


def test_a_key_no_record_has_is_one_line_and_not_complete(pretrained_base, make_cfg, tmp_path):
    written = json.loads((pretrained_base["output_dir"] / "metrics.json").read_text())
    run = tmp_path / "edited"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({**written, "top1_typo": 0.9}))
    with pytest.raises(RecordError) as err:
        RunRecord.from_json(run / "metrics.json")
    message = str(err.value)
    assert "\n" not in message and str(run / "metrics.json") in message and "top1_typo" in message
    assert RunRecord.read(run) is None
    assert completed(run, make_cfg("task=pretrain")) is None
    assert report.main([str(tmp_path)]) == 1  # the report names it in one line


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '{"data": {"where": "x"}}'])
def test_a_file_that_is_no_record_is_one_line(tmp_path, content):
    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(RecordError) as err:
        RunRecord.from_json(tmp_path / "metrics.json")
    assert "\n" not in str(err.value) and str(tmp_path / "metrics.json") in str(err.value)
    assert RunRecord.read(tmp_path) is None


def test_an_optimized_metric_no_record_has_is_one_line():
    measured = {"val_top1": 0.5, "size_pct": 1.0}
    with pytest.raises(RecordError, match="'size_percent' is not a metric a run records"):
        sweeper_value(OmegaConf.create({"optimized_metrics": ["val_top1", "size_percent"]}), measured)
    assert sweeper_value(OmegaConf.create({"optimized_metrics": ["val_top1", "size_pct"]}), measured) == (0.5, 1.0)
