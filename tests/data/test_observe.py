import numpy as np
import pytest

from mlic.data.observe import observe, observe_uniform, partial, single_positive


@pytest.fixture
def full():
    rng = np.random.RandomState(1)
    t = (rng.rand(400, 12) < 0.25).astype(np.int8)
    t[:5] = 0  # images without any positive
    return t


def test_single_positive_keeps_exactly_one_true_positive(full):
    obs = single_positive(full, seed=1200)
    assert obs.dtype == np.int8 and obs.shape == full.shape
    has_pos = full.sum(1) > 0
    np.testing.assert_array_equal((obs == 1).sum(1), has_pos.astype(int))
    assert np.all(full[obs == 1] == 1)
    assert np.all(obs[~has_pos] == -1)
    assert set(np.unique(obs)) <= {-1, 1}


def test_same_seed_same_result_other_seed_differs(full):
    np.testing.assert_array_equal(single_positive(full, 7), single_positive(full, 7))
    assert not np.array_equal(single_positive(full, 7), single_positive(full, 8))


def test_follows_cole_et_al_random_stream():
    # Their generator: one RandomState per split; per row shuffle the positive indices, keep the first,
    # then shuffle the negative indices (drawing numbers even when none are kept).
    full = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.int8)
    rng = np.random.RandomState(1200)
    expected = np.full(full.shape, -1, np.int8)
    for i, row in enumerate(full):
        pos = np.nonzero(row == 1)[0]
        rng.shuffle(pos)
        expected[i, pos[0]] = 1
        rng.shuffle(np.nonzero(row == 0)[0])
    np.testing.assert_array_equal(single_positive(full, 1200), expected)


def test_choice_is_roughly_uniform_over_positives():
    full = np.ones((3000, 3), np.int8)
    counts = (single_positive(full, 0) == 1).sum(0)
    assert counts.min() > 900


def test_observe_uniform_negatives(full):
    obs = observe_uniform(full, num_pos=1, num_neg=2, seed=0)
    assert np.all((obs == 0).sum(1) == 2)
    assert np.all(full[obs == 0] == 0)


def test_partial_keeps_share(full):
    obs = partial(full, 0.3, seed=0)
    kept = (obs != -1).mean()
    assert 0.27 < kept < 0.33
    assert np.all(obs[obs != -1] == full[obs != -1])
    with pytest.raises(ValueError):
        partial(full, 1.5)


def test_observe_by_name(full):
    assert observe(full, None) is None
    np.testing.assert_array_equal(observe(full, "single-positive", 3), single_positive(full, 3))
    np.testing.assert_array_equal(observe(full, "partial:0.5", 3), partial(full, 0.5, 3))
    with pytest.raises(ValueError, match="unknown observation"):
        observe(full, "half")
