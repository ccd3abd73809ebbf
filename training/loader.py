"""The data order and the loader: which samples each process trains on at each step.

The stream of samples is epoch-wise permutations seeded by (seed, epoch); it is a pure
function of (seed, step), so a resumed run sees exactly the batches the uninterrupted one
would have. Micro-batches are built (frames decoded, sequences rendered, collated) by a
``torch.utils.data.DataLoader`` with ``num_workers`` processes, in the loop's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from training.dataset import Batch, GroundingDataset, collate
from training.recipe import TrainConfig


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def micro_batches(
    n: int, rc: TrainConfig, dist: Dist, step: int, groups: list[list[int]] | None = None
) -> Iterator[list[tuple]]:
    """The (index, epoch) lists of this process's micro-batches for optimiser *step*.

    The stream of samples is epoch-wise permutations seeded by (seed, epoch); global
    micro-batch k covers stream positions [k*B*W, (k+1)*B*W) and rank r takes its B.
    With *groups* (lists of sample indices covering 0..n-1), the groups are permuted
    instead and each keeps its samples together in the stream.
    """
    bw = rc.batch_size * dist.world
    perms: dict[int, np.ndarray] = {}
    for m in range(rc.grad_accum):
        k = step * rc.grad_accum + m
        out = []
        first = k * bw + dist.rank * rc.batch_size
        for p in range(first, first + rc.batch_size):
            epoch = p // n
            if epoch not in perms:
                perms[epoch] = _permutation(n, groups, np.random.default_rng((rc.seed, epoch)))
            out.append((int(perms[epoch][p % n]), epoch))
        yield out


def _permutation(n: int, groups: list[list[int]] | None, rng: np.random.Generator) -> np.ndarray:
    if groups is None:
        return rng.permutation(n)
    return np.concatenate([np.asarray(groups[g], np.int64) for g in rng.permutation(len(groups))])


def video_groups(dataset: GroundingDataset) -> list[list[int]]:
    """Sample indices grouped by video (first appearance order)."""
    by_video: dict[str, list[int]] = {}
    for i, s in enumerate(dataset.samples):
        by_video.setdefault(str(s.video), []).append(i)
    return list(by_video.values())


class StepBatches(torch.utils.data.Dataset):
    """Item k: this process's k-th micro-batch of the run (collated), so a data loader
    with worker processes decodes ahead in exactly the order the loop consumes."""

    def __init__(self, dataset: GroundingDataset, rc: TrainConfig, dist: Dist):
        self.dataset, self.rc, self.dist = dataset, rc, dist
        self.groups = video_groups(dataset) if rc.group_by_video else None

    def __len__(self) -> int:
        return self.rc.max_steps * self.rc.grad_accum

    def __getitem__(self, k: int) -> Batch:
        step, m = divmod(k, self.rc.grad_accum)
        items = list(micro_batches(len(self.dataset), self.rc, self.dist, step, self.groups))[m]
        return collate([self.dataset.get(i, e) for i, e in items])


def _as_is(x):
    return x


def batch_loader(dataset: GroundingDataset, rc: TrainConfig, dist: Dist, start_step: int):
    """Micro-batches from *start_step* on, decoded by ``rc.num_workers`` processes."""
    items = StepBatches(dataset, rc, dist)
    order = range(start_step * rc.grad_accum, len(items))
    return iter(
        torch.utils.data.DataLoader(
            items,
            batch_size=None,
            sampler=order,
            num_workers=rc.num_workers,
            collate_fn=_as_is,
            prefetch_factor=2 if rc.num_workers else None,
            # Its own generator: drawing the workers' base seed from the global one would
            # shift the model's random stream (LoRA dropout) on every resume.
            generator=torch.Generator().manual_seed(rc.seed),
        )
    )
