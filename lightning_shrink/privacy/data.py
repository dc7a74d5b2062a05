"""The training data of a private run: Poisson sampling, empty batches, and each batch's size.

:func:`take_over_training_data` rebuilds the Trainer's training DataLoader on the same dataset:

* its batches are **Poisson-sampled** (each example joins each batch independently with the sample
  rate ``q``; Opacus' samplers, the distributed one changed to yield empty local batches too, so
  that all ranks take the same number of steps);
* an **empty batch** (a valid Poisson draw) reaches ``training_step`` as one all-zero stand-in
  example in the structure of a real batch (many models, transformers' among them, cannot run a
  batch of zero examples); the plugin discards the stand-in's gradient, so the step is noise only,
  as DP-SGD prescribes, and is accounted like any other. The stand-in is made at fit start from the
  collated structure of one example with every value zeroed, the same in every worker process;
* the batch sampler is wrapped in a :class:`CountingBatchSampler`, which remembers how many
  examples each batch has. That count, not a tensor's shape, is what the per-sample engines check
  every layer against.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_shrink.lightning import compat
from lightning_shrink.privacy.errors import PrivacyError

__all__ = [
    "CountingBatchSampler",
    "DistributedPoissonSampler",
    "EmptyBatchCollate",
    "PrivateData",
    "take_over_training_data",
]

_PREFIX = "DifferentialPrivacy"


class DistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Opacus' distributed Poisson sampler, but yielding empty local batches too.

    Opacus' version skips an empty local batch, which would leave the ranks with different
    numbers of batches (and DDP waiting forever); an empty local batch is a valid Poisson draw.
    """

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        indices = indices[self.rank : self.total_size : self.num_replicas]
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield indices[mask.nonzero(as_tuple=False).reshape(-1)].tolist()


class CountingBatchSampler(Sampler[list[int]]):
    """Yields the batches of ``batch_sampler`` and remembers, in order, how many examples each has.

    The DataLoader iterates its batch sampler in the main process (also with worker processes) and
    hands batches out in order, so the ``k``-th count taken with :meth:`next_count` belongs to the
    ``k``-th batch that reaches the training loop. A new pass over the data forgets the counts of
    batches that were fetched ahead but never trained on.
    """

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self._counts: collections.deque[int] = collections.deque()

    def __iter__(self) -> Iterator[list[int]]:
        self._counts.clear()
        for indices in self.batch_sampler:
            self._counts.append(len(indices))
            yield indices

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def next_count(self) -> int:
        """The number of examples of the next batch that reaches ``training_step``."""
        if not self._counts:
            raise PrivacyError(
                f"{_PREFIX}: a training batch arrived that the Poisson sampler did not produce; its number "
                "of examples is unknown, so it cannot be clipped per example"
            )
        return self._counts.popleft()


class EmptyBatchCollate:
    """``collate_fn`` for Poisson batches: the DataLoader's own for examples, and for an empty batch
    a copy of :attr:`stand_in`, one all-zero example in the structure of a real batch."""

    def __init__(self, collate_fn: Any, stand_in: Any) -> None:
        self.collate_fn = collate_fn
        self.stand_in = stand_in

    def __call__(self, examples: list[Any]) -> Any:
        if examples:
            return self.collate_fn(examples)
        return _zeros_like(self.stand_in, "")


_ZERO_LEAVES: tuple[type, ...] = (str, bytes, bool, int, float, type(None))


def _zeros_like(value: Any, path: str) -> Any:
    """``value`` (a collated batch) with every tensor and every number or string zeroed."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, Mapping):
        return type(value)({k: _zeros_like(v, f"{path}[{k!r}]") for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuples
        return type(value)(
            *(_zeros_like(v, f"{path}.{f}") for f, v in zip(value._fields, value, strict=True))
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_zeros_like(v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(value, _ZERO_LEAVES):
        return type(value)() if value is not None else None
    raise PrivacyError(
        f"{_PREFIX}: the collate function's output holds a {type(value).__name__} at {path or 'the top'}, "
        "from which no data-free stand-in for an empty Poisson batch can be made; batches must be tensors, "
        "numbers or strings, in mappings, lists or tuples"
    )


@dataclass
class PrivateData:
    """The training data after the take-over."""

    loader: DataLoader
    counter: CountingBatchSampler
    dataset_size: int
    sample_rate: float
    #: Whether an empty batch arrives as one all-zero stand-in example (Poisson sampling).
    stand_in_for_empty: bool


def take_over_training_data(trainer: pl.Trainer, poisson_sampling: bool) -> PrivateData:
    """Rebuild the Trainer's training DataLoader (see the module docs) and put it in the fit loop.

    Raises:
        PrivacyError: no or several training dataloaders, a loader that is not a
            ``torch.utils.data.DataLoader``, one that does not batch examples (``batch_size=None``),
            an ``IterableDataset``, a dataset without length, or a batch structure from which no
            empty batch can be built.
    """
    loaders = compat.load_train_dataloaders(trainer)
    if loaders is None:
        raise PrivacyError(
            f"{_PREFIX}: no training dataloader to take over (limit_train_batches=0 or no training_step)"
        )
    if len(loaders) != 1:
        raise PrivacyError(
            f"{_PREFIX}: {len(loaders)} training dataloaders; Poisson sampling needs exactly one"
        )
    dl = loaders[0]
    if not isinstance(dl, DataLoader):
        raise PrivacyError(
            f"{_PREFIX}: the training data is a {type(dl).__name__}, not a torch DataLoader; it cannot be "
            "Poisson-sampled"
        )
    if isinstance(dl.dataset, IterableDataset):
        raise PrivacyError(
            f"{_PREFIX}: the training DataLoader reads an IterableDataset, which cannot be Poisson-sampled "
            "(each example must be selectable by index)"
        )
    if dl.batch_sampler is None:
        raise PrivacyError(
            f"{_PREFIX}: the training DataLoader does not batch (batch_size=None), so each item of its "
            "dataset would count as one example of the privacy analysis; let the DataLoader batch single "
            "examples"
        )
    try:
        n = len(dl.dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise PrivacyError(f"{_PREFIX}: the training dataset has no length: {exc}") from exc
    world = trainer.world_size
    num_batches = len(dl)
    sample_rate = (
        min(1.0, dl.batch_size * world / n) if dl.batch_size is not None else min(1.0, 1.0 / num_batches)
    )
    if not poisson_sampling:
        rank_zero_warn(
            f"{_PREFIX}(poisson_sampling=False): the dataloader's own sampling is kept; the reported epsilon "
            "assumes Poisson sampling and is NOT a formal guarantee for this run"
        )
        counter = CountingBatchSampler(dl.batch_sampler)
        collate = dl.collate_fn
    else:
        # Different sampling randomness on every rank, reproducible under `seed_everything`.
        seed = int(torch.randint(0, 2**62, (1,)).item()) + 7919 * trainer.global_rank
        generator = torch.Generator().manual_seed(seed)
        if world > 1:
            sampler: Any = DistributedPoissonSampler(
                total_size=n, sample_rate=sample_rate, steps=num_batches, generator=generator
            )
        else:
            sampler = UniformWithReplacementSampler(
                num_samples=n, sample_rate=sample_rate, steps=num_batches, generator=generator
            )
        counter = CountingBatchSampler(sampler)
        collate = EmptyBatchCollate(dl.collate_fn, _zeros_like(dl.collate_fn([dl.dataset[0]]), ""))
    extra: dict[str, Any] = {}
    if dl.num_workers > 0:
        extra = dict(prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers)
    loader = DataLoader(
        dl.dataset,
        batch_sampler=counter,
        collate_fn=collate,
        num_workers=dl.num_workers,
        pin_memory=dl.pin_memory,
        timeout=dl.timeout,
        worker_init_fn=dl.worker_init_fn,
        multiprocessing_context=dl.multiprocessing_context,
        **extra,
    )
    compat.replace_train_dataloaders(trainer, [loader])
    return PrivateData(
        loader=loader,
        counter=counter,
        dataset_size=n,
        sample_rate=sample_rate,
        stand_in_for_empty=poisson_sampling,
    )
