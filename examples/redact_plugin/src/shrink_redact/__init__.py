"""shrink-redact: drop, mask or hash configured fields of training batches before the model sees them.

An in-house lightning-shrink plugin (see ``README.md``). Not differential privacy: no noise, no
accounting; it guarantees only that the raw values of the configured fields never reach
``training_step``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_shrink import ReportRow, hookimpl

__all__ = ["ACTIONS", "RedactFields"]

#: What can be done to a field.
ACTIONS = ("drop", "mask", "hash")

ENV_FIELDS = "SHRINK_REDACT_FIELDS"
ENV_SALT = "SHRINK_REDACT_SALT"
REDACTED = "[REDACTED]"


def _parse_fields(spec: str) -> dict[str, str]:
    fields = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, action = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_FIELDS}: expected 'field=action' items, got {item!r}")
        fields[name.strip()] = action.strip()
    return fields


class RedactFields:
    """Redact configured fields of dict batches in ``shrink_train_batch_start``.

    Args:
        fields: Field name to action (``"drop"``, ``"mask"`` or ``"hash"``). ``None`` reads
            ``SHRINK_REDACT_FIELDS`` (``"email=hash,user_id=drop"``).
        salt: Secret key of the HMAC used by ``"hash"``. ``None`` reads ``SHRINK_REDACT_SALT``;
            required when a field is hashed.
        hash_buckets: Hashed integer tensors are mapped into ``[0, hash_buckets)``, e.g. the size of
            the embedding table that reads them.
        mask_value: Fill value of masked tensors.
        token_ids: Field name to ``(token ids, replacement id)``: those ids are replaced inside the
            token tensor (e.g. ids of person names in ``input_ids``).
        missing_ok: Do not raise when a configured field is absent from a dict batch.
    """

    def __init__(
        self,
        fields: Mapping[str, str] | None = None,
        salt: str | bytes | None = None,
        hash_buckets: int = 2**31 - 1,
        mask_value: int | float = 0,
        token_ids: Mapping[str, tuple[Iterable[int], int]] | None = None,
        missing_ok: bool = False,
    ) -> None:
        if fields is None:
            fields = _parse_fields(os.environ.get(ENV_FIELDS, ""))
        for name, action in fields.items():
            if action not in ACTIONS:
                raise ValueError(
                    f"RedactFields: action for field {name!r} must be one of {ACTIONS}, got {action!r}"
                )
        if salt is None:
            salt = os.environ.get(ENV_SALT)
        if "hash" in fields.values() and not salt:
            raise ValueError(
                f"RedactFields: `salt` (or {ENV_SALT}) is required to hash fields "
                f"{[n for n, a in fields.items() if a == 'hash']}: an unkeyed hash of a small value space "
                "is reversible by enumeration"
            )
        if not isinstance(hash_buckets, int) or hash_buckets < 2:
            raise ValueError(f"RedactFields: `hash_buckets` must be an int >= 2, got {hash_buckets!r}")
        self.fields = dict(fields)
        self.salt = salt.encode() if isinstance(salt, str) else salt
        self.hash_buckets = hash_buckets
        self.mask_value = mask_value
        self.token_ids = {
            name: (torch.as_tensor(sorted(set(ids)), dtype=torch.long), int(replacement))
            for name, (ids, replacement) in (token_ids or {}).items()
        }
        self.missing_ok = missing_ok
        self.redacted_batches = 0
        self.redacted_values = 0
        #: The name the plugin is registered under: the ``technique`` of its report rows.
        self.name = "redact"

    @property
    def active(self) -> bool:
        return bool(self.fields or self.token_ids)

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def shrink_plugin_registered(self, plugin: Any, plugin_name: str) -> None:
        """Learn the registered name (the entry point's, or the one given to ``register``)."""
        if plugin is self and plugin_name != str(id(self)):  # pluggy names an unnamed plugin by id()
            self.name = plugin_name

    @hookimpl
    def shrink_fit_start(self) -> None:
        """Say once what is redacted (or that nothing is configured)."""
        if not self.active:
            rank_zero_info(
                f"shrink-redact: no fields configured ({ENV_FIELDS} is empty): nothing is redacted"
            )
        else:
            rank_zero_info(
                f"shrink-redact: redacting {self.fields} and token ids in {sorted(self.token_ids)}"
            )

    @hookimpl(tryfirst=True)
    def shrink_train_batch_start(self, batch: Any) -> None:
        """Drop, mask or hash the configured fields before any other plugin or the model sees them."""
        if not self.active:
            return
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                f"shrink-redact: fields {sorted(self.fields)} are configured but the batch is a "
                f"{type(batch).__name__}, not a dict: nothing could be redacted"
            )
        for name, action in self.fields.items():
            if name not in batch:
                if self.missing_ok:
                    continue
                raise KeyError(
                    f"shrink-redact: configured field {name!r} is not in the batch (keys: {sorted(batch)}); "
                    "pass missing_ok=True if that is expected"
                )
            value = batch[name]
            if action == "drop":
                del batch[name]
            elif action == "mask":
                batch[name] = self._mask(value)
            else:
                batch[name] = self._hash(value)
            self.redacted_values += _count(value)
        for name, (ids, replacement) in self.token_ids.items():
            tokens = batch[name]
            hit = torch.isin(tokens, ids.to(tokens.device))
            tokens.masked_fill_(hit, replacement)
            self.redacted_values += int(hit.sum())
        self.redacted_batches += 1

    @hookimpl
    def shrink_report_rows(self) -> list[ReportRow] | None:
        """Which fields were redacted, and how many values."""
        if not self.active:
            return None
        return [
            ReportRow(self.name, "fields", ", ".join(f"{n}={a}" for n, a in self.fields.items())),
            ReportRow(self.name, "redacted values", self.redacted_values),
        ]

    # ------------------------------------------------------------------ actions

    def _mask(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.full_like(value, self.mask_value)
        if isinstance(value, (list, tuple)):
            return [REDACTED for _ in value]
        return REDACTED

    def _digest(self, data: bytes) -> bytes:
        assert self.salt is not None
        return hmac.new(self.salt, data, hashlib.sha256).digest()

    def _hash(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dtype.is_floating_point or value.dtype.is_complex:
                raise TypeError(
                    "shrink-redact: only integer tensors can be hashed; mask or drop float fields"
                )
            flat = value.detach().cpu().reshape(-1).tolist()
            hashed = [
                int.from_bytes(self._digest(str(v).encode())[:8], "big") % self.hash_buckets for v in flat
            ]
            return torch.tensor(hashed, dtype=value.dtype).reshape(value.shape).to(value.device)
        if isinstance(value, (list, tuple)):
            return [self._digest(str(v).encode()).hex() for v in value]
        return self._digest(str(value).encode()).hex()


def _count(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return len(value)
    return 1
