"""The pruning plugin's sparse encoding of exports: exact round trips, and damaged encodings refused
with a ValueError that names the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lightning_shrink
from lightning_shrink.export.layout import CONFIG_NAME
from lightning_shrink.manager import get_plugin_manager
from lightning_shrink.pruning.export import MASK_SUFFIX, VALUES_SUFFIX


def _encoded(tensor: torch.Tensor, name: str = "a.weight") -> tuple[dict, dict]:
    pm = get_plugin_manager(autoload=False)
    tensors, metadata = {name: tensor.clone()}, {}
    pm.hook.shrink_export(model=nn.Linear(1, 1), tensors=tensors, metadata=metadata)
    assert name + MASK_SUFFIX in tensors, "the tensor was not encoded"
    return tensors, json.loads(json.dumps(metadata))


def _decode(tensors: dict, metadata: dict) -> dict:
    get_plugin_manager(autoload=False).hook.shrink_load(tensors=tensors, metadata=metadata)
    return tensors


def _sparse(shape=(33, 17), keep=0.3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < keep)


def test_sparse_export_round_trip_through_the_hooks():
    pm = get_plugin_manager(autoload=False)
    torch.manual_seed(0)
    dense = torch.randn(33, 17)
    sparse = _sparse()
    int8 = (torch.randint(-5, 5, (64, 8), dtype=torch.int8) * (torch.rand(64, 8) > 0.6)).to(torch.int8)
    bf16 = (torch.randn(40) * (torch.rand(40) > 0.8)).to(torch.bfloat16)
    tensors = {"a.weight": sparse.clone(), "b.weight": dense.clone(), "c.q": int8.clone(), "d": bf16.clone()}
    metadata: dict = {}
    pm.hook.shrink_export(model=nn.Linear(1, 1), tensors=tensors, metadata=metadata)
    assert "a.weight" not in tensors and "b.weight" in tensors and "c.q" not in tensors
    assert set(metadata["pruning"]["tensors"]) == {"a.weight", "c.q", "d"}
    assert sum(t.numel() * t.element_size() for t in tensors.values()) < (
        sparse.numel() * 4 + dense.numel() * 4 + int8.numel() + bf16.numel() * 2
    )
    metadata = json.loads(json.dumps(metadata))
    pm.hook.shrink_load(tensors=tensors, metadata=metadata)
    assert set(tensors) == {"a.weight", "b.weight", "c.q", "d"}
    for name, ref in {"a.weight": sparse, "b.weight": dense, "c.q": int8, "d": bf16}.items():
        assert tensors[name].dtype == ref.dtype and torch.equal(tensors[name], ref), name


@pytest.mark.parametrize(
    "dtype",
    ["Tensor", "load", "nn", "float99", 7, None, ["float32"]],
    ids=["a-class", "a-function", "a-module", "unknown", "an-int", "none", "a-list"],
)
def test_a_dtype_that_is_not_a_torch_dtype_is_refused_naming_the_tensor(dtype):
    tensors, metadata = _encoded(_sparse())
    metadata["pruning"]["tensors"]["a.weight"]["dtype"] = dtype
    with pytest.raises(ValueError, match=r"sparse tensor 'a\.weight' .*is not a torch dtype"):
        _decode(tensors, metadata)


def _damage_values(tensors, metadata):
    tensors["a.weight" + VALUES_SUFFIX] = tensors["a.weight" + VALUES_SUFFIX][:-1]


def _damage_values_dtype(tensors, metadata):
    tensors["a.weight" + VALUES_SUFFIX] = tensors["a.weight" + VALUES_SUFFIX].double()


def _damage_bitmask_length(tensors, metadata):
    tensors["a.weight" + MASK_SUFFIX] = tensors["a.weight" + MASK_SUFFIX][:-3]


def _damage_bitmask_bits(tensors, metadata):
    tensors["a.weight" + MASK_SUFFIX][0] ^= 0b1000_0000


def _damage_padding(tensors, metadata):
    tensors["a.weight" + MASK_SUFFIX][-1] |= 1  # 33 * 17 = 561 bits: the last 7 are padding


def _damage_shape(tensors, metadata):
    metadata["pruning"]["tensors"]["a.weight"]["shape"] = [33, "17"]


def _damage_shape_size(tensors, metadata):
    metadata["pruning"]["tensors"]["a.weight"]["shape"] = [34, 17]


def _damage_count(tensors, metadata):
    metadata["pruning"]["tensors"]["a.weight"]["nonzero"] += 1


def _damage_entry(tensors, metadata):
    metadata["pruning"]["tensors"]["a.weight"] = "float32"


def _damage_missing(tensors, metadata):
    del tensors["a.weight" + VALUES_SUFFIX]


def _damage_both(tensors, metadata):
    tensors["a.weight"] = torch.zeros(33, 17)


def _damage_unlisted(tensors, metadata):
    tensors["b.weight" + MASK_SUFFIX] = torch.zeros(3, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_damage_values, r"values .* for \d+ set bits"),
        (_damage_values_dtype, r"torch\.float64 values .* torch\.float32 tensor"),
        (_damage_bitmask_length, "its bitmask is torch.uint8 of shape"),
        (_damage_bitmask_bits, r"values .* for \d+ set bits"),
        (_damage_padding, "bits set past the tensor's end"),
        (_damage_shape, "is not a list of non-negative ints"),
        (_damage_shape_size, "its bitmask is torch.uint8 of shape"),
        (_damage_count, "the metadata counts"),
        (_damage_entry, "not a mapping"),
        (_damage_missing, "bitmask or values are missing"),
        (_damage_both, "stored both dense and encoded"),
        (_damage_unlisted, r"sparse tensor 'b\.weight'.*does not list"),
    ],
)
def test_a_damaged_sparse_encoding_is_a_value_error_naming_the_tensor(damage, match):
    tensors, metadata = _encoded(_sparse())
    damage(tensors, metadata)
    with pytest.raises(ValueError, match=r"sparse tensor '[ab]\.weight' of the export: ") as info:
        _decode(tensors, metadata)
    assert info.match(match)


@pytest.mark.parametrize("tensors_entry", [None, [], "a.weight"])
def test_damaged_encoding_metadata_is_a_value_error(tensors_entry):
    tensors, metadata = _encoded(_sparse())
    metadata["pruning"]["tensors"] = tensors_entry
    with pytest.raises(ValueError, match=r"metadata\['pruning'\]\['tensors'\] must map tensor names"):
        _decode(tensors, metadata)
    metadata["pruning"] = {"format": "bitmask-v9", "tensors": {}}
    with pytest.raises(ValueError, match="unknown sparse encoding 'bitmask-v9'"):
        _decode(tensors, metadata)


def test_load_of_an_export_with_a_damaged_dtype_names_the_tensor(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(16, 16) < 0.2)
    lightning_shrink.export(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert "0.weight" in config["pruning"]["tensors"]
    config["pruning"]["tensors"]["0.weight"]["dtype"] = "Tensor"
    (tmp_path / "out" / CONFIG_NAME).write_text(json.dumps(config))
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"sparse tensor '0\.weight' of the export: its dtype 'Tensor'"):
        lightning_shrink.load(tmp_path / "out", model=fresh)
