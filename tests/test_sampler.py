"""The permutation and the global sampler: pure functions of (seed, epoch), no Ray, no data."""

from __future__ import annotations

import random
import time
import tracemalloc

import numpy as np
import pytest
import torch

from common.errors import ConfigError, DataError
from dataloading.config import ShuffleMode
from dataloading.permutation import Permutation, round_keys
from dataloading.sampler import BlockOrder, DistributedGlobalSampler, GlobalSampler, batch_fingerprint

MODES = [dict(mode="global"), dict(mode="block", block_size=7, window_blocks=3)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 100, 1000, 4097])
def test_permutation_is_a_bijection_with_an_inverse(n):
    perm = Permutation(n, round_keys("t", n))
    values = perm(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    assert perm.inverse(values).tolist() == list(range(n))


def test_permutation_rejects_positions_outside_its_domain():
    with pytest.raises(IndexError, match="out of range"):
        Permutation(10, round_keys(0))([10])


def test_permutation_looks_shuffled():
    n = 10_000
    values = Permutation(n, round_keys(1))(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), values)[0, 1]) < 0.05
    assert (values == np.arange(n)).sum() < 20  # fixed points: about 1 expected


@pytest.mark.parametrize("n,bs,w", [(100, 7, 3), (100, 10, 2), (37, 5, 1), (64, 64, 4), (13, 20, 4), (1001, 33, 4)])
def test_block_order_is_a_bijection_that_keeps_windows_local(n, bs, w):
    for epoch in range(3):
        order = BlockOrder(n, 5, epoch, block_size=bs, window_blocks=w)
        ids = order(np.arange(n))
        assert sorted(ids.tolist()) == list(range(n))
        windows = order.window_of(np.arange(n))
        for win in np.unique(windows):
            blocks = set((ids[windows == win] // bs).tolist())
            assert blocks == set(order.window_blocks_of(int(win)).tolist())
            assert len(blocks) <= w


@pytest.mark.parametrize("kw", MODES)
def test_epoch_has_no_duplicates_and_drops_a_changing_tail(kw):
    n, b = 103, 10  # 10 batches per epoch, tail of 3
    s = GlobalSampler(n, b, seed=3, **kw)
    assert s.batches_per_epoch == 10
    dropped = []
    for epoch in range(3):
        seen = np.concatenate([s.global_batch(epoch * 10 + k) for k in range(10)])
        assert len(seen) == len(set(seen.tolist())) == 100
        dropped.append(frozenset(range(n)) - frozenset(seen.tolist()))
        assert len(dropped[-1]) == 3
    assert len(set(dropped)) > 1  # not the same sequences skipped every epoch


@pytest.mark.parametrize("kw", MODES)
def test_rank_slices_union_to_the_global_batch(kw):
    s = GlobalSampler(1000, 24, seed=1, **kw)
    for step in (0, 5, 41, 42, 200):
        g = s.global_batch(step)
        for world in (1, 2, 3, 4, 6, 8, 12, 24):
            parts = [s.local_batch(step, r, world) for r in range(world)]
            assert np.array_equal(np.concatenate(parts), g)


def test_same_seed_same_order_different_seed_or_epoch_different_order():
    a, b, c = GlobalSampler(500, 50, 7), GlobalSampler(500, 50, 7), GlobalSampler(500, 50, 8)
    assert np.array_equal(a.global_batch(3), b.global_batch(3))
    assert not np.array_equal(a.global_batch(3), c.global_batch(3))
    assert not np.array_equal(a.global_batch(0), a.global_batch(10))  # step 10 = epoch 1, batch 0


def test_fingerprint_is_stable():
    assert batch_fingerprint(np.arange(8)) == batch_fingerprint(list(range(8)))
    assert batch_fingerprint(np.arange(8)) != batch_fingerprint(np.arange(1, 9))
    assert batch_fingerprint(np.arange(8)) < 2**52
    # pinned: the hash of the ids must never change between versions, or audits break
    assert batch_fingerprint(np.array([0, 1, 2, 3])) == 3697312112050990


def _run(sampler: GlobalSampler, steps: range, world: int) -> list[np.ndarray]:
    return [np.concatenate([sampler.local_batch(t, r, world) for r in range(world)]) for t in steps]


@pytest.mark.parametrize("kw", MODES)
def test_resume_on_a_different_world_size_continues_the_same_sequence(kw):
    n, b, total, cut = 997, 12, 250, 97  # crosses epoch boundaries (83 batches per epoch)
    reference = _run(GlobalSampler(n, b, 11, **kw), range(total), 1)
    first = GlobalSampler(n, b, 11, **kw)
    before = _run(first, range(cut), 4)
    state = first.state_dict(cut)
    assert state["epoch"] == 1 and state["samples_consumed"] == cut * b
    resumed, step = GlobalSampler.from_state(state, world_size=2)
    after = _run(resumed, range(step, total), 2)
    assert all(np.array_equal(x, y) for x, y in zip(before + after, reference, strict=True))
    again = GlobalSampler(n, b, 11, **kw)
    assert again.load_state_dict(state, world_size=6) == cut


def test_random_sweep_of_sizes_worlds_and_resume_points():
    """Bounded randomised check (hypothesis is not installed): 40 cases, fixed seed."""
    rng = random.Random(1234)
    for _ in range(40):
        b = rng.choice([1, 2, 4, 6, 8, 12, 16])
        n = rng.randint(b, 400)
        kw = rng.choice([dict(mode="global"),
                         dict(mode="block", block_size=rng.randint(1, 50), window_blocks=rng.randint(1, 5))])
        seed = rng.randint(0, 10**6)
        worlds = [w for w in (1, 2, 3, 4, 6, 8, 12, 16) if b % w == 0]
        s = GlobalSampler(n, b, seed, **kw)
        epoch_ids = np.concatenate(_run(s, range(s.batches_per_epoch), rng.choice(worlds)))
        assert len(set(epoch_ids.tolist())) == len(epoch_ids) == s.batches_per_epoch * b
        assert epoch_ids.min() >= 0 and epoch_ids.max() < n
        cut = rng.randint(0, 3 * s.batches_per_epoch)
        resumed, step = GlobalSampler.from_state(s.state_dict(cut), world_size=rng.choice(worlds))
        assert step == cut
        for t in (cut, cut + 1, cut + s.batches_per_epoch):
            assert np.array_equal(_run(resumed, [t], rng.choice(worlds))[0], s.global_batch(t))


def test_resume_errors_name_the_problem():
    s = GlobalSampler(1000, 16, 0)
    state = s.state_dict(10)
    with pytest.raises(ConfigError, match="global_batch_size changed from 16.*to 32"):
        GlobalSampler(1000, 32, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        s.load_state_dict(state, world_size=3)
    with pytest.raises(DataError, match="dataset changed.*1000.*999"):
        GlobalSampler(999, 16, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed changed"):
        GlobalSampler(1000, 16, 1).load_state_dict(state)
    with pytest.raises(ConfigError, match="mode changed"):
        GlobalSampler(1000, 16, 0, mode="block", block_size=10).load_state_dict(state)
    with pytest.raises(DataError, match="malformed"):
        GlobalSampler.from_state({"samples_consumed": 0})
    with pytest.raises(ConfigError, match="divisible"):
        s.local_batch(0, 0, 5)


def test_dataset_smaller_than_one_global_batch_is_a_data_error():
    with pytest.raises(DataError, match="7 sequences, fewer than one global batch of 8"):
        GlobalSampler(7, 8, 0)


@pytest.mark.parametrize("kw", [dict(mode="global"), dict(mode="block", block_size=100_000, window_blocks=4)])
def test_ten_billion_sequences_resume_deep_in_constant_memory(kw):
    n, b = 10**10, 1024
    s = GlobalSampler(n, b, 0, **kw)
    step = 10**8 + 12345
    tracemalloc.start()
    started = time.perf_counter()
    resumed, at = GlobalSampler.from_state(s.state_dict(step), world_size=8)
    ids = resumed.local_batch(at, 3, 8)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ids) == 128 and ids.min() >= 0 and ids.max() < n
    assert np.array_equal(ids, s.global_batch(step)[3 * 128 : 4 * 128])
    assert peak < 4 << 20  # bytes: O(batch), nothing of size N
    assert elapsed < 5  # generous: a correctness bound, not a benchmark


def test_torch_sampler_in_a_dataloader_and_its_state():
    n, b, world = 100, 8, 2
    data = torch.arange(n)
    ref = GlobalSampler(n, b, 5)
    ranks = [DistributedGlobalSampler(n, b, 5, rank=r, world_size=world) for r in range(world)]
    loaders = [torch.utils.data.DataLoader(data, batch_size=b // world, sampler=s) for s in ranks]
    assert len(ranks[0]) == 12 * 4
    its = [iter(dl) for dl in loaders]
    for step in range(5):
        got = torch.cat([next(it) for it in its]).numpy()
        assert np.array_equal(got, ref.global_batch(step))
    state = ranks[0].state_dict()
    assert state["samples_consumed"] == 5 * b
    fresh = DistributedGlobalSampler(n, b, 5, rank=0, world_size=1)  # elastic: one rank now
    fresh.load_state_dict(state)
    assert np.array_equal(np.array(list(fresh)[:b]), ref.global_batch(5))
    fresh.set_epoch(2)
    assert np.array_equal(np.array(list(fresh)[:b]), ref.global_batch(24))


def test_sampler_mode_enum_and_bad_settings():
    assert GlobalSampler(10, 2, 0, mode=ShuffleMode.BLOCK, block_size=3).mode is ShuffleMode.BLOCK
    with pytest.raises(ConfigError, match="block_size"):
        GlobalSampler(10, 2, 0, mode="block")
    with pytest.raises(ValueError, match="AUTO"):
        GlobalSampler(10, 2, 0, mode="auto")


def test_order_is_pinned_across_versions():
    # a checkpoint's sampler state only means the same data if the order never changes
    assert GlobalSampler(1000, 4, 0).global_batch(0).tolist() == [508, 76, 514, 384]
    assert GlobalSampler(1000, 4, 0, mode="block", block_size=10).global_batch(7).tolist() == [64, 913, 691, 69]


PINNED = [  # (n, mode kwargs, ids [:3] of step 5 rank 3 of 8, ids [-3:] of epoch 1 step 2 rank 7 of 8)
    (10**6, {}, [982455, 285304, 915886], [346443, 650796, 391511]),
    (10**9 + 7, {}, [996870163, 786119413, 39964566], [173118676, 191130446, 791704394]),
    (10**10, {}, [5204696760, 9934310452, 9280120661], [3218323253, 415158127, 840855078]),
    (2**40 + 1, {}, [114104913271, 251941330174, 601459712483], [576317319417, 629420212272, 719133811639]),
    (10**6, dict(mode="block", block_size=100_000), [592963, 315995, 534046], [390425, 723537, 782310]),
    (10**10, dict(mode="block", block_size=100_000), [3825192963, 9622715995, 3825134046],
     [7273490425, 8015623537, 8015682310]),
]


@pytest.mark.parametrize("n,kw,step5,epoch1", PINNED)
def test_concrete_ids_are_pinned_for_every_evaluation_path(n, kw, step5, epoch1):
    """Ids produced by the first (hashing) implementation, for sizes that take each path: the first
    call of a permutation hashes, later calls use lookup tables (with "mod" tables up to radix
    2**14, arithmetic wrap above, none above 2**17). A speed-up must never change these."""
    s = GlobalSampler(n, 4096, 17, window_blocks=4, **kw)
    for _ in range(3):  # first call hashes, the next ones use the tables
        assert s.local_batch(5, 3, 8)[:3].tolist() == step5
        assert s.local_batch(s.batches_per_epoch + 2, 7, 8)[-3:].tolist() == epoch1
    fine = GlobalSampler(10**6 + 3, 1000, 17, mode="block", block_size=7, window_blocks=3)
    for _ in range(2):
        assert fine.global_batch(999)[-3:].tolist() == [275326, 275329, 275327]  # crosses the short block's window


@pytest.mark.parametrize("n", [2, 3, 17, 1000, 4097, 10**6 + 3, 2**28 + 5, 10**9 + 7, 10**10, 2**35])
def test_table_and_hash_forms_of_the_permutation_agree(n):
    perm = Permutation(n, round_keys("forms", n))
    x = np.unique(np.random.default_rng(n).integers(0, n, 4000, dtype=np.int64))
    hashed = perm._forward(x.copy(), tables=False)
    assert np.array_equal(perm._forward(x.copy(), tables=True), hashed)
    assert np.array_equal(perm(x), hashed) and np.array_equal(perm(x), hashed)  # default: hash, then tables
    assert np.array_equal(perm.inverse(hashed), x)
    start = int(x[0])
    assert np.array_equal(perm.span(start, min(500, n - start)), perm(np.arange(start, min(start + 500, n))))


@pytest.mark.parametrize("n,bs,w", [(1001, 33, 4), (100, 7, 3), (64, 64, 4), (13, 20, 4), (5000, 9, 2), (997, 1, 5)])
def test_block_order_span_matches_the_positionwise_order(n, bs, w):
    rng = random.Random(n * bs + w)
    order = BlockOrder(n, 2, 1, block_size=bs, window_blocks=w)
    ref = BlockOrder(n, 2, 1, block_size=bs, window_blocks=w)(np.arange(n))
    for _ in range(30):
        first = rng.randint(0, n)
        count = rng.randint(0, n - first)
        assert np.array_equal(order.span(first, count), ref[first : first + count])
    with pytest.raises(IndexError, match="out of range"):
        order.span(n - 1, 2)
