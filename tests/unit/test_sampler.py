"""The resumable batch sampler on its own: every example once per epoch, the order a pure function of (seed,
epoch), a resume skips exactly the batches done, length grouping keeps lengths together, and ranks split every
global batch the same way whatever the world size."""

from __future__ import annotations

from fulltune.data.sampler import ResumableBatchSampler, sample_seed


def epoch(sampler: ResumableBatchSampler, e: int, skip: int = 0) -> list[list]:
    sampler.set_epoch(e, skip)
    return list(sampler)


def test_each_example_once_and_order_is_a_function_of_seed_and_epoch() -> None:
    s = ResumableBatchSampler(23, 4, seed=7)
    first = epoch(s, 0)
    assert len(first) == len(s) == 6 and sorted(i for b in first for i in b) == list(range(23))
    assert epoch(ResumableBatchSampler(23, 4, seed=7), 0) == first  # a fresh sampler: the same order
    assert epoch(s, 1) != first and epoch(ResumableBatchSampler(23, 4, seed=8), 0) != first


def test_resume_skips_exactly_the_batches_done() -> None:
    s = ResumableBatchSampler(30, 4, seed=1)
    whole = epoch(s, 2)
    assert epoch(s, 2, skip=3) == whole[3:]


def test_no_shuffle_keeps_the_file_order() -> None:
    s = ResumableBatchSampler(10, 4, seed=0, shuffle=False)
    assert epoch(s, 5) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_length_grouping_batches_similar_lengths() -> None:
    lengths = [(i * 37) % 50 + 1 for i in range(256)]
    grouped = epoch(ResumableBatchSampler(256, 8, seed=3, lengths=lengths, group_by_length=True), 0)
    plain = epoch(ResumableBatchSampler(256, 8, seed=3, lengths=lengths), 0)

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert sorted(i for b in grouped for i in b) == list(range(256))
    assert padding(grouped) < padding(plain) / 4


def test_ranks_split_each_global_batch_and_agree_with_one_process() -> None:
    one = epoch(ResumableBatchSampler(20, 4, seed=5), 0)
    ranks = [epoch(ResumableBatchSampler(20, 2, seed=5, rank=r, world_size=2), 0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert [a + b for a, b in zip(*ranks, strict=True)] == one


def test_seeds_per_example_do_not_depend_on_position() -> None:
    s = ResumableBatchSampler(9, 3, seed=11, with_seeds=True)
    batches = epoch(s, 1)
    assert all(seed == sample_seed(11, 1, i) for b in batches for i, seed in b)
    assert epoch(s, 1, skip=1) == batches[1:]
