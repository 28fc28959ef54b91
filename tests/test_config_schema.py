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
        (["data.batch_size=big"], "data.batch_size"),
        (["data.val_fraction=half"], "data.val_fraction"),
        (["data.val_fraction=true"], "data.val_fraction"),
        (["data.on_device=0.5"], "data.on_device"),
        (["adapter.lr=fast"], "adapter.lr"),
        (["adapter.groups=1.5"], "adapter.groups"),
        (["adapter=serial", "adapter.stages=[a]"], "adapter.stages"),
        (["adapter=lora", "adapter.rank=four"], "adapter.rank"),
        (["base.width=wide"], "base.width"),
        (["base.precise_bn.every_epoch=perhaps"], "base.precise_bn.every_epoch"),
        (["+experiment=digits5_5", "base.pretrain.epochs=many"], "base.pretrain.epochs"),
        (["trainer.channels_last=perhaps"], "trainer.channels_last"),
        (["trainer.compile=0.5"], "trainer.compile"),
        (["trainer=ddp", "trainer.sync_batchnorm=perhaps"], "trainer.sync_batchnorm"),
        (["hparams_search=size_vs_accuracy", "search.trial=first"], "search.trial"),
        (["tap_cache.views=two"], "tap_cache.views"),
        (["tap_cache.max_gb=lots"], "tap_cache.max_gb"),
    ],
)
def test_a_value_of_the_wrong_type_fails_at_composition(overrides, key):
    with pytest.raises(ConfigCompositionException) as failed:
        compose(overrides)
    assert key in f"{failed.value} {failed.value.__cause__}"


def test_a_key_a_typed_group_does_not_have_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as failed:
        compose(["data.batchsize=8"])
    assert "batchsize" in f"{failed.value} {failed.value.__cause__}"


def test_the_typed_groups_keep_their_values():
    cfg = compose(["reduction=prune_iterative", "reduction.at_epochs=[2,4,6]", "predict.top_k=3"])
    assert cfg.reduction.at_epochs == [2, 4, 6] and cfg.reduction.depthwise_rate == 0.9
    assert cfg.predict.top_k == 3 and cfg.export.dtype == "fp32"
    cfg = compose(["adapter=serial", "adapter.groups=channels", "trainer.compile=aot_eager", "data.on_device=auto"])
    assert cfg.adapter.groups == "channels" and cfg.adapter.stages == [1, 2, 3] and cfg.trainer.compile == "aot_eager"
    assert cfg.data.on_device == "auto" and compose(["adapter.groups=4"]).adapter.groups == 4


@pytest.mark.parametrize("pruner", ["search/pruner=halving", "+search.pruner={_target_:optuna.pruners.NopPruner}"])
def test_the_search_node_takes_a_pruner(pruner):
    assert compose(["hparams_search=size_vs_accuracy"], return_hydra_config=True).search.pruner is None
    cfg = compose(["hparams_search=size_vs_accuracy", pruner], return_hydra_config=True)
    assert cfg.search.pruner._target_.startswith("optuna.pruners.")
