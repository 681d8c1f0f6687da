"""A batch order that is a pure function of (seed, epoch): the same batches on every run, on every rank, and after
a resume, which just skips the batches already done. Optionally groups examples of similar length (less padding).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-example seed for augmentation, independent of worker processes and of where a run resumed."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields lists of dataset indices (or (index, seed) pairs with `with_seeds`) for one epoch.

    Call `set_epoch(epoch, skip_batches)` before iterating. With `world_size` > 1 each rank takes its slice of
    every global batch (batch_size x world_size examples), so all ranks see the same number of batches.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
        with_seeds: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self.group_by_length = group_by_length and lengths is not None
        self.with_seeds = with_seeds
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Batches of batch_size x world_size examples: the same list whatever the world size, so a run can
        resume on another number of processes with the same global batches."""
        n, bs = self.num_examples, self.batch_size * self.world_size
        if not self.shuffle:
            order = list(range(n))
            return [order[i : i + bs] for i in range(0, n, bs)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        if not self.group_by_length:
            return [order[i : i + bs] for i in range(0, n, bs)]
        # Sort within mega-batches of 64 batches by length (longest first), then shuffle the batch order: most
        # padding goes away while the order stays random and a pure function of (seed, epoch).
        mega = bs * 64
        batches: list[list[int]] = []
        lengths = self.lengths
        assert lengths is not None
        for start in range(0, n, mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
            batches.extend(chunk[i : i + bs] for i in range(0, len(chunk), bs))
        perm = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in perm]

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's slice of each global batch; with several ranks a short last global batch is dropped so
        every rank sees the same number of batches."""
        batches = self.global_batches(epoch)
        if self.world_size == 1:
            return batches
        bs = self.batch_size
        full = [b for b in batches if len(b) == bs * self.world_size]
        return [b[self.rank * bs : (self.rank + 1) * bs] for b in full]

    def __len__(self) -> int:
        if self.world_size == 1:
            return -(-self.num_examples // self.batch_size)
        return self.num_examples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches(self.epoch)[self.skip_batches :]:
            if self.with_seeds:
                yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]
            else:
                yield batch
