"""DistillationConfig: validated at construction with one error policy (TypeError for a bad type,
ValueError for a bad value, the message naming KnowledgeDistillation and the argument), frozen, and
what KnowledgeDistillation exposes as ``config``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_shrink import KnowledgeDistillation
from lightning_shrink.distillation import DistillationConfig
from lightning_shrink.testing.models import TinyClassifier


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=0.0), ValueError, r"`temperature` must be a number in \(0, inf\), got 0.0"),
        (dict(temperature="2"), TypeError, "`temperature` must be a number"),
        (dict(temperature=float("nan")), ValueError, "`temperature` must be finite"),
        (dict(alpha=1.5), ValueError, r"`alpha` must be a number in \[0, 1\], got 1.5"),
        (dict(alpha=True), TypeError, "`alpha` must be a number"),
        (dict(alpha=lambda step: -1.0), ValueError, r"`alpha\(0\)` must be a number in \[0, 1\]"),
        (dict(alpha=lambda step: "x"), TypeError, r"`alpha\(0\)` must be a number"),
        (dict(kl_weight=-1.0), ValueError, "`kl_weight` must be a number in"),
        (dict(kl_weight=0.0), ValueError, "would do nothing"),
        (dict(hidden_mse_weight=1.0), ValueError, "need `layer_map`"),
        (dict(layer_map={1: 1}), ValueError, "`layer_map` is given but .* are 0"),
        (dict(hidden_mse_weight=1.0, layer_map={1: "x"}), TypeError, "`layer_map` entry 1: 'x' must be"),
        (dict(hidden_mse_weight=1.0, layer_map=[1, 1]), TypeError, "`layer_map` must be a mapping"),
        (dict(hidden_mse_weight=1.0, layer_map={}), ValueError, "need `layer_map`"),
        (dict(attention_weight=1.0), ValueError, "`attention_layer_map`"),
        (dict(attention_weight=1.0, attention_layer_map={"a": "b"}), TypeError, "integer layer indices"),
        (dict(attention_layer_map={1: 1}), ValueError, "`attention_weight` is 0"),
        (dict(hidden_mse_weight=1.0, layer_map={1: 1}, cache_key="idx"), ValueError, "`cache_key` caches"),
        (dict(cache_key=3), TypeError, "`cache_key` must be"),
        (dict(teacher_dtype=torch.int8), ValueError, "`teacher_dtype` must be a floating"),
        (dict(teacher_dtype="bfloat16"), TypeError, "`teacher_dtype` must be a torch.dtype"),
        (dict(student=0), TypeError, "`student` must be"),
        (dict(teacher_class="Bert"), TypeError, "`teacher_class` must be a class"),
        (dict(logits_fn=1), TypeError, "`logits_fn` must be callable"),
        (dict(projection_lr=0.0), ValueError, "`projection_lr` must be a number in"),
        (dict(projection_weight_decay=-1.0), ValueError, "`projection_weight_decay` must be"),
        (dict(projection_lr=1e-3), ValueError, "`projection_lr` configures the learned projections"),
        (dict(teacher="/nonexistent/teacher.ckpt"), FileNotFoundError, "`teacher="),
        (dict(teacher=42), TypeError, "`teacher` must be"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, error, match):
    kwargs = {"teacher": TinyClassifier(), **kwargs}
    with pytest.raises(error, match=match) as info:
        KnowledgeDistillation(**kwargs)
    assert str(info.value).startswith("KnowledgeDistillation: ")


def test_the_callback_exposes_a_frozen_normalized_config():
    teacher = TinyClassifier()
    kd = KnowledgeDistillation(
        teacher, temperature=3, alpha=1, hidden_cosine_weight=1, layer_map={2: 1, 0: 0}, projection_lr=0.01
    )
    config = kd.config
    assert isinstance(config, DistillationConfig)
    assert config.teacher is teacher
    assert config.temperature == 3.0 and isinstance(config.temperature, float)
    assert config.alpha == 1.0 and isinstance(config.alpha, float)
    assert config.layer_map == ((2, 1), (0, 0))  # pairs, in the order given
    assert config.term_names == ("kl", "hidden_cosine")
    assert kd.plugin.config is config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 1.0
    # dataclasses.replace validates again
    assert dataclasses.replace(config, temperature=4.0).layer_map == config.layer_map
    with pytest.raises(ValueError, match="`temperature`"):
        dataclasses.replace(config, temperature=-1.0)


def test_an_alpha_schedule_is_checked_at_every_step():
    config = DistillationConfig(teacher=TinyClassifier(), alpha=lambda step: 0.5 if step < 3 else 2.0)
    assert config.alpha_at(2) == 0.5
    with pytest.raises(ValueError, match=r"`alpha\(3\)` must be a number in \[0, 1\], got 2.0"):
        config.alpha_at(3)
