"""Property-based tests of the permutation and the global sampler (hypothesis).

Over dataset sizes, global batches, world sizes, resume points and both shuffle modes: the ranks'
slices union to the global batch, no sequence twice within an epoch, a resume on another world
size continues the uninterrupted sequence, the order is a function of the seed. Examples are
derandomized (the same cases on every run, so CI is deterministic) and kept few and small.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataloading.permutation import Permutation, round_keys
from dataloading.sampler import GlobalSampler

FEW = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
BATCHES = [1, 2, 3, 4, 6, 8, 12, 16, 24]
WORLDS = [1, 2, 3, 4, 6, 8, 12, 16, 24]


@st.composite
def settings_of_a_sampler(draw, *, max_n: int = 600, batches=BATCHES):
    """(num_samples, global_batch, seed, mode kwargs) of a small sampler in either mode."""
    b = draw(st.sampled_from(batches))
    n = draw(st.integers(b, max(b, max_n)))
    seed = draw(st.integers(0, 2**31))
    if draw(st.booleans()):
        return n, b, seed, dict(mode="global")
    return n, b, seed, dict(mode="block", block_size=draw(st.integers(1, 60)), window_blocks=draw(st.integers(1, 5)))


def _worlds(b: int) -> list[int]:
    return [w for w in WORLDS if b % w == 0]


def _global_by_ranks(sampler: GlobalSampler, step: int, world: int) -> np.ndarray:
    return np.concatenate([sampler.local_batch(step, r, world) for r in range(world)])


@FEW
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31), data=st.data())
def test_permutation_is_a_bijection_and_spans_match(n, seed, data):
    perm = Permutation(n, round_keys("prop", seed))
    values = perm(np.arange(n))
    assert np.array_equal(np.sort(values), np.arange(n))
    assert np.array_equal(perm.inverse(values), np.arange(n))
    start = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(0, n - start))
    assert np.array_equal(perm.span(start, count), values[start : start + count])  # the table form by now


@FEW
@given(settings_of_a_sampler(), st.integers(0, 40))
def test_rank_slices_union_to_the_global_batch(params, step):
    n, b, seed, kw = params
    s = GlobalSampler(n, b, seed, **kw)
    g = s.global_batch(step)
    assert len(g) == b and len(np.unique(g)) == b and g.min() >= 0 and g.max() < n
    for world in _worlds(b):
        assert np.array_equal(_global_by_ranks(s, step, world), g)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(10**6, 10**12), b=st.sampled_from([8, 24, 512]), seed=st.integers(0, 2**31),
       step=st.integers(0, 10**7), block=st.integers(1, 10**6), mode=st.sampled_from(["global", "block"]))
def test_rank_slices_union_at_large_sizes_deep_into_training(n, b, seed, step, block, mode):
    s = GlobalSampler(n, b, seed, mode=mode, block_size=block)
    g = s.global_batch(step)
    assert len(np.unique(g)) == b and g.min() >= 0 and g.max() < n
    for world in _worlds(b)[-2:]:
        assert np.array_equal(_global_by_ranks(s, step, world), g)
    fresh, at = GlobalSampler.from_state(s.state_dict(step))
    assert at == step and np.array_equal(fresh.global_batch(step), g)


@FEW
@given(settings_of_a_sampler(), st.integers(0, 2), st.data())
def test_no_sequence_twice_within_an_epoch(params, epoch, data):
    n, b, seed, kw = params
    s = GlobalSampler(n, b, seed, **kw)
    world = data.draw(st.sampled_from(_worlds(b)))
    first = epoch * s.batches_per_epoch
    ids = np.concatenate([_global_by_ranks(s, t, world) for t in range(first, first + s.batches_per_epoch)])
    assert len(ids) == s.batches_per_epoch * b == n - n % b  # the tail of n mod b is skipped
    assert len(np.unique(ids)) == len(ids) and ids.min() >= 0 and ids.max() < n


@FEW
@given(settings_of_a_sampler(batches=[4, 8, 12, 16, 24]), st.data())
def test_resume_from_world_4_on_world_2_continues_the_uninterrupted_sequence(params, data):
    n, b, seed, kw = params
    reference = GlobalSampler(n, b, seed, **kw)
    cut = data.draw(st.integers(0, 3 * reference.batches_per_epoch))
    more = data.draw(st.integers(1, 2 * reference.batches_per_epoch))
    first = GlobalSampler(n, b, seed, **kw)
    before = [_global_by_ranks(first, t, 4) for t in range(cut)]
    resumed, step = GlobalSampler.from_state(first.state_dict(cut), world_size=2)
    assert step == cut
    after = [_global_by_ranks(resumed, t, 2) for t in range(step, step + more)]
    for t, got in enumerate(before + after):
        assert np.array_equal(got, reference.global_batch(t)), f"step {t} differs (cut at {cut})"


@FEW
@given(settings_of_a_sampler(), st.data())
def test_resume_between_any_two_world_sizes(params, data):
    n, b, seed, kw = params
    s = GlobalSampler(n, b, seed, **kw)
    cut = data.draw(st.integers(0, 3 * s.batches_per_epoch))
    w1, w2 = data.draw(st.sampled_from(_worlds(b))), data.draw(st.sampled_from(_worlds(b)))
    resumed, step = GlobalSampler.from_state(s.state_dict(cut), world_size=w2)
    for t in (step, step + 1, step + s.batches_per_epoch):
        assert np.array_equal(_global_by_ranks(resumed, t, w2), _global_by_ranks(s, t, w1))


@FEW
@given(settings_of_a_sampler(max_n=1000), st.integers(0, 2**31), st.integers(0, 2))
def test_same_seed_same_order_different_seed_different_order(params, other_seed, epoch):
    n, b, seed, kw = params
    s, twin = GlobalSampler(n, b, seed, **kw), GlobalSampler(n, b, seed, **kw)
    steps = range(epoch * s.batches_per_epoch, (epoch + 1) * s.batches_per_epoch)
    order = np.concatenate([s.global_batch(t) for t in steps])
    assert np.array_equal(np.concatenate([twin.global_batch(t) for t in steps]), order)
    if other_seed != seed and n >= 50:  # a few sequences can be ordered the same by chance; 50 cannot
        other = GlobalSampler(n, b, other_seed, **kw)
        assert not np.array_equal(np.concatenate([other.global_batch(t) for t in steps]), order)
