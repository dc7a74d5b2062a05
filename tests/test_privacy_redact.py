"""The in-house redaction plugin of ``examples/redact_plugin``: registered in code in a real
``Trainer.fit`` (alone and next to DifferentialPrivacy), the model never sees the raw fields."""

from __future__ import annotations

import copy
import hashlib
import hmac
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_shrink import DifferentialPrivacy, ShrinkCallback, report
from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "examples" / "redact_plugin"


@pytest.fixture(scope="module")
def shrink_redact():
    sys.path.insert(0, str(PLUGIN_DIR / "src"))
    try:
        yield importlib.import_module("shrink_redact")
    finally:
        sys.path.remove(str(PLUGIN_DIR / "src"))


class People(Dataset):
    """Features and labels next to personal fields."""

    def __init__(self, n: int = 64) -> None:
        self.data = random_classification_data(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.data[i]
        return {
            "x": x,
            "labels": y,
            "user_id": torch.tensor(1000 + i),
            "email": f"person{i}@example.com",
            "tokens": torch.tensor([i % 5, 7, 3, 7]),
        }


class SeeingClassifier(TinyClassifier):
    """Records every batch that reaches ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append(copy.deepcopy(batch))
        return F.cross_entropy(self(batch["x"]), batch["labels"])


def _hmac(salt: bytes, value: str) -> str:
    return hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("with_dp", [False, True], ids=["redact", "redact+dp"])
def test_model_never_sees_raw_fields(shrink_redact, with_dp: bool) -> None:
    redact = shrink_redact.RedactFields(
        fields={"email": "hash", "user_id": "drop"}, salt="team-secret", token_ids={"tokens": ([7], 0)}
    )
    callbacks: list[Any] = [ShrinkCallback(plugins=[redact])]
    if with_dp:
        callbacks.append(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"))
    model = SeeingClassifier()
    trainer = cpu_trainer(callbacks=callbacks, max_steps=4)
    trainer.fit(model, DataLoader(People(), batch_size=8, shuffle=True))

    assert len(model.seen) == 4
    raw_emails = {f"person{i}@example.com" for i in range(64)}
    for batch in model.seen:
        assert "user_id" not in batch
        assert not raw_emails & set(batch["email"])
        assert all(len(e) == 64 for e in batch["email"])  # hex HMAC-SHA256
        assert not (batch["tokens"] == 7).any()
    # hashing is a keyed pseudonym: the same value maps to the same digest
    digests = {_hmac(b"team-secret", e) for e in raw_emails}
    assert set().union(*(set(b["email"]) for b in model.seen)) <= digests
    assert redact.redacted_batches == 4
    rows = {r.metric: r.value for r in report(trainer).select(technique="redact")}
    assert rows["fields"] == "email=hash, user_id=drop"
    if with_dp:
        sizes = {len(b["email"]) for b in model.seen}
        assert len(sizes) > 1 or trainer.callbacks[1].plugin.steps == 4  # Poisson-sampled batches


def test_mask_and_integer_hash(shrink_redact) -> None:
    redact = shrink_redact.RedactFields(
        fields={"user_id": "hash", "email": "mask"}, salt=b"k", hash_buckets=97
    )
    model = SeeingClassifier()
    cpu_trainer(callbacks=[ShrinkCallback(plugins=[redact])], max_steps=2).fit(
        model, DataLoader(People(), batch_size=8)
    )
    first = model.seen[0]
    assert first["email"] == [shrink_redact.REDACTED] * 8
    ids = first["user_id"]
    assert ((ids >= 0) & (ids < 97)).all() and not ((ids >= 1000) & (ids < 1064)).any()
    expected = int.from_bytes(hmac.new(b"k", b"1000", hashlib.sha256).digest()[:8], "big") % 97
    assert int(ids[0]) == expected


def test_missing_field_and_bad_configuration_fail_loudly(shrink_redact) -> None:
    with pytest.raises(ValueError, match="`salt`"):
        shrink_redact.RedactFields(fields={"email": "hash"})
    with pytest.raises(ValueError, match="must be one of"):
        shrink_redact.RedactFields(fields={"email": "encrypt"})
    redact = shrink_redact.RedactFields(fields={"phone": "drop"})
    with pytest.raises(KeyError, match="configured field 'phone' is not in the batch"):
        cpu_trainer(callbacks=[ShrinkCallback(plugins=[redact])], max_steps=1).fit(
            SeeingClassifier(), DataLoader(People(), batch_size=8)
        )


def test_entry_point_is_declared_and_reads_its_configuration(shrink_redact, monkeypatch) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["lightning_shrink"]["redact"]
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    assert cls is shrink_redact.RedactFields
    monkeypatch.setenv("SHRINK_REDACT_FIELDS", "email=hash, user_id=drop")
    monkeypatch.setenv("SHRINK_REDACT_SALT", "s")
    plugin = cls()  # the manager instantiates entry-point classes without arguments
    assert plugin.fields == {"email": "hash", "user_id": "drop"} and plugin.active
    monkeypatch.delenv("SHRINK_REDACT_FIELDS")
    assert not cls().active


def test_report_rows_carry_the_registered_name(shrink_redact) -> None:
    from lightning_shrink.manager import get_plugin_manager

    redact = shrink_redact.RedactFields(fields={"email": "mask"})
    pm = get_plugin_manager()
    pm.register(redact, "team-redact")
    trainer = cpu_trainer(callbacks=[ShrinkCallback(pluginmanager=pm)], max_steps=1)
    trainer.fit(SeeingClassifier(), DataLoader(People(), batch_size=8))
    assert redact.name == "team-redact"
    assert {r.technique for r in report(trainer).rows if r.metric == "fields"} == {"team-redact"}
