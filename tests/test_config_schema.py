"""The typed config groups (bnn_adapt/run/schema.py): a value of the wrong type fails when the config is
composed, naming the key, before anything runs."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from bnn_adapt.run.config import compose


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["predict.top_k=abc"], "predict.top_k"),
        (["predict.packed=maybe"], "predict.packed"),
        (["reduction=prune", "reduction.at_epoch=soon"], "reduction.at_epoch"),
        (["reduction=prune_iterative", "reduction.at_epochs=[1,x]"], "reduction.at_epochs"),
        (["reduction=prune_iterative", "reduction.rewind=perhaps"], "reduction.rewind"),
    ],
)
def test_a_value_of_the_wrong_type_fails_at_composition(overrides, key):
    with pytest.raises(ConfigCompositionException) as failed:
        compose(overrides)
    assert key in f"{failed.value} {failed.value.__cause__}"


def test_the_typed_groups_keep_their_values():
    cfg = compose(["reduction=prune_iterative", "reduction.at_epochs=[2,4,6]", "predict.top_k=3"])
    assert cfg.reduction.at_epochs == [2, 4, 6] and cfg.reduction.depthwise_rate == 0.9
    assert cfg.predict.top_k == 3 and cfg.export.dtype == "fp32"
