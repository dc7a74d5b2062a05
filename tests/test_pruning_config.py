"""GradualMagnitudePruning's configuration: a frozen, validated PruningConfig; one error policy
(TypeError for a bad type, ValueError for a bad value, the callback and argument named); the one module
selector's strictness at set-up."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from torch import nn
from torch.utils.data import DataLoader

from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.pruning import Pattern, PruningConfig
from lightning_shrink.pruning.selection import select_targets
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
)


def _loader() -> DataLoader:
    return DataLoader(random_classification_data(32), batch_size=8)


def test_the_callback_builds_a_frozen_normalized_config():
    cb = GradualMagnitudePruning(
        0.5,
        start_step=2,
        end_step=0.75,
        pattern="2:4",
        modules="net.*",
        exclude_modules=["net.0"],
        parameter_names="weight",
        module_types=[nn.Linear],
    )
    config = cb.config
    assert isinstance(config, PruningConfig)
    assert config == PruningConfig(
        0.5,
        start_step=2,
        end_step=0.75,
        pattern=Pattern("nm", 2, 4),
        modules=("net.*",),
        exclude_modules=("net.0",),
        parameter_names=("weight",),
        module_types=(nn.Linear,),
    )
    assert config.pattern == Pattern("nm", 2, 4) and config.modules == ("net.*",)
    assert config.parameter_names == ("weight",) and config.module_types == (nn.Linear,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_sparsity = 0.9
    # the plugin works from the same object; ddp_spawn pickles it with the Trainer
    assert cb.plugin.config is config
    assert pickle.loads(pickle.dumps(config)) == config
    overrides = PruningConfig(0.5, sparsity_overrides={"a.*": 0.25, "a.b": 0.75})
    assert overrides.sparsity_overrides == (("a.*", 0.25), ("a.b", 0.75))
    assert overrides.describe()["sparsity_overrides"] == [["a.*", 0.25], ["a.b", 0.75]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target_sparsity=1.0), ValueError, r"`target_sparsity` must be a number in \[0, 1\), got 1.0"),
        (dict(target_sparsity=-0.1), ValueError, "`target_sparsity` must be a number in"),
        (dict(target_sparsity="0.5"), TypeError, "`target_sparsity` must be a number, got '0.5'"),
        (dict(target_sparsity=True), TypeError, "`target_sparsity` must be a number"),
        (dict(target_sparsity=float("nan")), ValueError, "`target_sparsity` must be finite"),
        (dict(initial_sparsity=0.6), ValueError, "`initial_sparsity` .* must not exceed `target_sparsity`"),
        (dict(start_step=10, end_step=5), ValueError, r"`end_step` \(5\) must be after `start_step` \(10\)"),
        (dict(start_step=0.5, end_step=0.2), ValueError, "`end_step` .* must be after `start_step`"),
        (dict(end_step=1.5), ValueError, "`end_step` as a float is a fraction"),
        (dict(end_step=0), ValueError, "`end_step` must be >= 1 optimizer steps"),
        (dict(start_step=-1), ValueError, "`start_step` must be >= 0 optimizer steps"),
        (dict(start_step="10"), TypeError, "`start_step` must be an int"),
        (dict(frequency=0), ValueError, "`frequency` must be >= 1"),
        (dict(frequency=None), TypeError, "`frequency` must be an int"),
        (dict(pattern="4:4"), ValueError, "`pattern='4:4'`: N:M keeps N weights in every M"),
        (dict(pattern="5:4"), ValueError, "1 <= N < M"),
        (
            dict(pattern="2-4"),
            ValueError,
            "`pattern` must be 'unstructured', 'rows', 'heads', 'neurons' or 'N:M'",
        ),
        (dict(pattern=4), TypeError, "`pattern` must be a string"),
        (dict(target_sparsity=0.8, pattern="2:4"), ValueError, "`target_sparsity` is 0.8 .*set it to 0.5"),
        (dict(scope="model"), ValueError, r"`scope` must be one of \['global', 'layer'\]"),
        (dict(schedule="exp"), ValueError, "`schedule` must be one of"),
        (dict(schedule=3), TypeError, "`schedule` must be one of .* or a callable"),
        (dict(modules=[]), ValueError, "`modules` is empty; pass None"),
        (dict(modules=[3]), TypeError, "`modules` must hold strings"),
        (dict(exclude_modules=5), TypeError, "`exclude_modules` must be a module name or glob pattern"),
        (dict(module_types=[nn.Linear, "Conv2d"]), TypeError, "`module_types` must be a non-empty sequence"),
        (dict(module_types=[int]), TypeError, "torch.nn.Module classes"),
        (dict(parameter_names=()), ValueError, "`parameter_names` must name at least one parameter"),
        (dict(parameter_names=[1]), TypeError, "`parameter_names` must be a parameter name"),
        (dict(prune_output_layer=1), TypeError, "`prune_output_layer` must be a bool"),
        (dict(log_layer_sparsity="yes"), TypeError, "`log_layer_sparsity` must be a bool"),
        (dict(mask_gradients=None), TypeError, "`mask_gradients` must be a bool"),
        (dict(sparsity_overrides={"x": 1.2}), ValueError, r"`sparsity_overrides\['x'\]` must be a number"),
        (dict(sparsity_overrides=["x"]), TypeError, "`sparsity_overrides` must be a mapping"),
        (dict(sparsity_overrides={"": 0.5}), ValueError, "`sparsity_overrides` holds an empty pattern"),
        (dict(pattern="2:4", sparsity_overrides={"x": 0.5}), ValueError, "cannot be combined with an N:M"),
        (
            dict(target_sparsity=0.0, schedule=lambda t: 0.0, sparsity_overrides={"x": 0.5}),
            ValueError,
            "needs `target_sparsity` > 0",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    kwargs.setdefault("target_sparsity", 0.5)
    with pytest.raises(error, match=f"^GradualMagnitudePruning: .*{match}"):
        GradualMagnitudePruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(modules=["nothing.*"]), ValueError, "`modules` pattern 'nothing.*' matches no module"),
        (dict(exclude_modules=["net.9"]), ValueError, "`exclude_modules` pattern 'net.9' matches no module"),
        (
            dict(modules=["net.*"], exclude_modules=["net.*"]),
            ValueError,
            "no parameter matched the selection",
        ),
        (
            dict(modules=["net.0", "net.1"]),
            TypeError,
            "`modules` names 'net.1', which cannot be selected: it is a ReLU",
        ),
        (
            dict(modules=["net.0", "net.[13]"]),
            ValueError,
            r"`modules` pattern 'net.\[13\]' selects no parameter",
        ),
        (dict(modules=["net.0"], parameter_names="gain"), ValueError, "no parameter matched the selection"),
        (
            dict(pattern="4:8", target_sparsity=0.5, prune_output_layer=True, modules=["classifier"]),
            ValueError,
            "multiple of 8",
        ),
        (
            dict(start_step=0.9, end_step=3),
            ValueError,
            "`end_step` resolves to step 3, not after `start_step`",
        ),
        (
            dict(sparsity_overrides={"net.7": 0.2}),
            ValueError,
            "`sparsity_overrides` pattern 'net.7' matches no",
        ),
    ],
)
def test_bad_selection_fails_at_setup(kwargs, error, match):
    kwargs.setdefault("target_sparsity", 0.5)
    model = TinyClassifier(hidden=12)
    model.classifier = nn.Linear(12, 2)
    trainer = cpu_trainer(callbacks=[GradualMagnitudePruning(**kwargs)], max_steps=4)
    with pytest.raises(error, match=f"^GradualMagnitudePruning: .*{match}"):
        trainer.fit(model, _loader())
    assert trainer.global_step == 0


def test_selection_by_name_type_and_parameter():
    model = TinyTransformerClassifier(tiny_bert())

    def names(**kwargs):
        return {t.name for t in select_targets(model, PruningConfig(0.5, **kwargs))}

    default = names()
    assert len(default) == 2 * 6 + 1  # 6 Linear per layer + pooler; classifier excluded
    assert names(prune_output_layer=True) == default | {"model.classifier.weight"}
    only = select_targets(
        model, PruningConfig(0.5, modules="*.attention.self.*", exclude_modules=["*.value"], scope="layer")
    )
    assert {t.name.split(".")[-2] for t in only} == {"query", "key"} and len({t.group for t in only}) == 4
    emb = names(module_types=(nn.Embedding,), parameter_names=("weight", "bias"))
    assert {n.split(".")[-2] for n in emb} == {
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
    }
    overrides = select_targets(model, PruningConfig(0.5, sparsity_overrides={"*.intermediate.dense": 0.9}))
    inter = [t for t in overrides if "intermediate" in t.name]
    assert inter and all(t.final_sparsity == 0.9 and t.group == t.name for t in inter)
    assert {t.group for t in overrides if t not in inter} == {"__global__"}
    # an exact name of a module that is not of `module_types` was asked for explicitly
    with pytest.raises(TypeError, match=r"`modules` names 'model\.bert\.embeddings\.word_embeddings'"):
        names(modules=["model.bert.embeddings.word_embeddings"])
    model.model.bert.encoder.requires_grad_(False)  # frozen parameters are never pruned
    assert names() == {"model.bert.pooler.dense.weight"}
    with pytest.raises(
        ValueError, match=r"`modules` pattern 'model\.bert\.encoder\.\*' selects no parameter"
    ):
        names(modules=["model.bert.encoder.*", "model.bert.pooler.*"])


def test_resolved_schedule_counts_optimizer_steps():
    config = PruningConfig(0.8, start_step=0.1, end_step=0.75, frequency=0.05)
    schedule = config.resolve_schedule(200)
    assert (schedule.start, schedule.end, schedule.frequency, schedule.final_step) == (20, 150, 10, 150)
    assert PruningConfig(0.8, start_step=5, schedule="constant").resolve_schedule(100).final_step == 5
    with pytest.raises(ValueError, match=r"`end_step=0\.75` is a fraction of the run's optimizer steps, but"):
        PruningConfig(0.8, end_step=0.75, frequency=2).resolve_schedule(float("inf"))
