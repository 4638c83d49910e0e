"""Fast linear probe (its steps in the one loop): Cole's split, the lazy row-wise Adam, learning, grid, seeds."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mlic.config import TrainConfig
from mlic.data.labelset import cole_split
from mlic.data.observe import single_positive
from mlic.engine.linear_probe import LinearProbe, grid_search, run_seeds, summarize_seeds, train_linear_probe
from mlic.engine.loop import TrainingError
from mlic.metrics import mean_average_precision
from mlic.optim import RowAdam


def synthetic(n: int = 1600, dim: int = 32, classes: int = 8, latent: int = 6, seed: int = 0):
    """Features from a random lift of a latent, labels from a random linear teacher (≥ 1 positive per row)."""
    rng = np.random.default_rng(seed)
    lift = rng.standard_normal((latent, dim))
    teacher = rng.standard_normal((latent, classes))
    z = rng.standard_normal((n, latent))
    score = z @ teacher + 0.3 * rng.standard_normal((n, classes))
    y = (score > 1.0).astype(np.int8)
    y[np.arange(n), score.argmax(1)] = 1
    x = np.maximum(z @ lift + 0.5 * rng.standard_normal((n, dim)), 0).astype(np.float32)
    return x, y


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: a second intra-op thread only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem():
    x, y = synthetic()
    obs = single_positive(y, seed=0)  # the library's own draw, not a copy of it
    return {"train": (x[:1000], obs[:1000]), "val": (x[1000:1300], y[1000:1300]), "test": (x[1300:], y[1300:])}


def test_cole_split_matches_their_recipe():
    train, val = cole_split(82_081)
    assert len(train) == 65_665 and len(val) == 16_416
    perm = np.random.RandomState(1200).permutation(82_081)
    np.testing.assert_array_equal(val, np.sort(perm[-16_416:]))
    np.testing.assert_array_equal(train, np.sort(perm[:65_665]))
    assert np.intersect1d(train, val).size == 0
    train0, val0 = cole_split(10, val_fraction=0.0)
    assert len(train0) == 10 and len(val0) == 0  # their perm[-0:] would take everything


def test_cole_split_agrees_with_labelset_hold_out():
    from mlic.data.labelset import LabelSet

    n = 1003
    labelset = LabelSet(["a"], [str(i) for i in range(n)], np.zeros((n, 1), dtype=np.int8))
    train_set, val_set = labelset.hold_out(0.2)
    train, val = cole_split(n)
    assert [int(p) for p in val_set.image_paths] == val.tolist()
    assert [int(p) for p in train_set.image_paths] == train.tolist()


def _dense_vs_row_adam(eps: float, epochs: int = 4) -> tuple[torch.Tensor, ...]:
    n, k, batch = 60, 5, 6
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(n, k, generator=gen, dtype=torch.float64)
    dense = torch.nn.Parameter(torch.zeros(n, k, dtype=torch.float64))
    lazy = torch.nn.Parameter(torch.zeros(n, k, dtype=torch.float64))
    opt = torch.optim.Adam([dense], lr=0.05, eps=eps)
    row_adam = RowAdam(lazy, lr=0.05, eps=eps)
    for epoch in range(epochs):
        if epoch == 2:  # a snapshot mid-training, turned into values only at the end
            snapshot, dense_then = row_adam.snapshot(), dense.detach().clone()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            rows = perm[i:i + batch]
            opt.zero_grad()
            ((dense[rows] - target[rows]) ** 2).sum().backward()
            opt.step()
            values = row_adam.catch_up(rows).requires_grad_(True)
            ((values - target[rows]) ** 2).sum().backward()
            row_adam.step(rows, values.grad)
    row_adam.flush()
    return dense.detach(), lazy.detach(), dense_then, row_adam.flushed_values(snapshot)


def test_row_adam_follows_dense_adam():
    dense, lazy, dense_then, lazy_then = _dense_vs_row_adam(eps=1e-30)  # without eps the coasting is exact
    torch.testing.assert_close(lazy, dense, atol=1e-10, rtol=0)
    torch.testing.assert_close(lazy_then, dense_then, atol=1e-10, rtol=0)
    dense, lazy, _, _ = _dense_vs_row_adam(eps=1e-8)
    assert (lazy - dense).abs().max() < 1e-4
    moved = (dense != 0).float().mean()
    assert moved == 1.0


def test_row_adam_requires_catch_up():
    param = torch.zeros(4, 2)
    row_adam = RowAdam(param, lr=0.1)
    with pytest.raises(RuntimeError, match="catch_up"):
        row_adam.step(torch.tensor([0, 1]), torch.ones(2, 2))


def test_fast_and_official_estimator_updates_agree(problem):
    (x, y) = problem["train"]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    states = {}
    for mode in ("official", "fast"):
        cfg = TrainConfig.official_linear(loss="role", loss_args={"expected_positives": 1.5}, estimator_update=mode)
        probe = LinearProbe(32, 8, len(x), cfg, observed=y, dtype=torch.float64)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, 480, 16):
                idx = perm[i:i + 16]
                probe.step(xt[idx].double(), yt[idx], idx)
        states[mode] = (probe.head.weight.detach().clone(), probe.estimator_logits().clone())
    torch.testing.assert_close(states["fast"][0], states["official"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(states["fast"][1], states["official"][1], atol=1e-3, rtol=0)


def test_linear_probe_learns(problem):
    (x, y), (xv, yv), (xt, yt) = problem["train"], problem["val"], problem["test"]
    chance = 100 * yt.mean()
    cfg = TrainConfig.linear_defaults(loss="role", loss_args={"expected_positives": 1.5}, epochs=8, batch_size=32,
                                      lr=1e-2)
    result = train_linear_probe(x, y, xv, yv, cfg, xt, yt)
    assert result.test_map > chance + 40, (result.test_map, chance)
    assert result.best_epoch == 1 + int(np.argmax([h["val_mAP"] for h in result.history]))  # 1-based
    assert result.val_map == pytest.approx(result.history[result.best_epoch - 1]["val_mAP"])
    assert [h["epoch"] for h in result.history] == list(range(1, 9))
    assert result.test_map == pytest.approx(mean_average_precision(result.scores(xt), yt), abs=1e-6)
    assert result.estimator_logits.shape == (len(x), 8)
    assert result.weight.shape == (8, 32) and result.bias.shape == (8,)


def test_official_and_fast_modes_reach_the_same_map(problem):
    (x, y), (xv, yv), (xt, yt) = problem["train"], problem["val"], problem["test"]
    maps = {}
    for mode in ("official", "fast"):
        cfg = TrainConfig.official_linear(loss="role", loss_args={"expected_positives": 1.5}, epochs=3,
                                         estimator_update=mode)
        maps[mode] = train_linear_probe(x, y, xv, yv, cfg, xt, yt).test_map
    assert abs(maps["fast"] - maps["official"]) < 0.5, maps


@pytest.mark.parametrize("loss", ["bce", "focal", "asl", "an", "an_ls", "wan", "epr"])
def test_every_loss_trains(problem, loss):
    (x, y), (xv, yv), (xt, yt) = problem["train"], problem["val"], problem["test"]
    cfg = TrainConfig.linear_defaults(loss=loss, epochs=4, batch_size=100, lr=1e-2)
    result = train_linear_probe(x, y, xv, yv, cfg, xt, yt)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.estimator_logits is None
    # test mAP is that of the best validation epoch's head on the separate test set, and it learned
    expected = mean_average_precision(result.scores(xt), yt)
    assert result.test_map == pytest.approx(expected, abs=1e-4)
    chance = mean_average_precision(np.random.default_rng(0).random(yt.shape), yt)
    assert result.test_map > chance + 3  # full-label losses see only the single positives here


def test_bad_inputs_are_one_line_errors(problem):
    (x, y), (xv, yv) = problem["train"], problem["val"]
    with pytest.raises(ValueError, match="channels"):
        train_linear_probe(x, y, xv[:, :10], yv)
    with pytest.raises(ValueError, match="--estimator-update 'sparse': choose one of official, fast"):
        train_linear_probe(x, y, xv, yv, TrainConfig.linear_defaults(estimator_update="sparse"))
    broken = x.copy()
    broken[3, 0] = np.nan
    with pytest.raises(TrainingError, match="learning rate"):
        train_linear_probe(broken, y, xv, yv, TrainConfig.linear_defaults(loss="an", epochs=1))


def test_grid_search_and_seed_summary(problem):
    (x, y), (xv, yv) = problem["train"], problem["val"]
    cfg = TrainConfig.linear_defaults(loss="an", epochs=2)
    grid = grid_search(x, y, xv, yv, cfg, batch_sizes=(50, 200), lrs=(1e-2, 1e-5))
    assert len(grid.runs) == 4
    assert grid.best.val_map == max(r["val_map"] for r in grid.runs)
    best_lr = max(grid.runs, key=lambda r: r["val_map"])["lr"]
    assert grid.best.config.lr == best_lr and best_lr == 1e-2  # 1e-5 barely moves in two epochs

    summary = run_seeds(x, y, xv, yv, replace(cfg, batch_size=100), seeds=(0, 1), test_x=xv, test_y=yv)
    assert summary.seeds == [0, 1]
    assert summary.val_mean == pytest.approx(np.mean(summary.val_maps))
    assert summary.val_std == pytest.approx(np.std(summary.val_maps, ddof=1))
    assert "±" in str(summary)
    with pytest.raises(ValueError):
        summarize_seeds([])


def test_config_round_trip():
    cfg = TrainConfig.official_linear(loss="role", loss_args={"expected_positives": 2.9})
    assert cfg.batch_size == 16 and cfg.lr == 1e-3 and cfg.estimator_update == "official"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"bogus": 1})
    assert TrainConfig.linear_defaults(4000).batch_size == 125 and TrainConfig.linear_defaults().batch_size == 1024


def test_linear_mode_keeps_sparse_targets_sparse_end_to_end(tiny_digits, tmp_path):
    """--mode linear on sparse train / val / test labels: batches read their rows, validation and test score
    the known entries; anything that asks for a whole dense matrix fails the test."""
    from mlic.config import ModelConfig
    from mlic.data.labelset import LabelSet
    from mlic.data.splits import Splits
    from mlic.data.targets import SparseTargets
    from mlic.engine.job import TrainJob
    from mlic.engine.run import run

    class NoWhole(SparseTargets):  # row reads (targets[rows]) and columns only: densifying fails the test
        def __array__(self, dtype=None, copy=None):
            raise AssertionError("densified")

    def sparse(labelset, seed, unknown):
        dense = np.asarray(labelset.targets).copy()
        dense[np.random.default_rng(seed).random(dense.shape) < unknown] = -1
        s = SparseTargets.from_dense(dense)
        return NoWhole(s.indptr, s.indices, s.values, dense.shape[1])

    splits, _, _ = tiny_digits
    train = LabelSet(splits["train"].classes, splits["train"].image_paths, sparse(splits["train"], 0, 0.0),
                     splits["train"].root, observed=sparse(splits["train"], 1, 0.7))
    val, test = (LabelSet(s.classes, s.image_paths, sparse(s, i, 0.3), s.root)
                 for i, s in ((2, splits["val"]), (3, splits["test"])))
    for loss in ("an", "ll_r"):  # losses without per-image state (ROLE's N x K estimator is dense by design)
        cfg = TrainConfig.linear_defaults(len(train), loss=loss, epochs=2)
        result = run(TrainJob(ModelConfig(num_classes=10, img_size=32), cfg, Splits(train, val, test),
                              tmp_path / loss, mode="linear", progress=False, log=lambda *a, **k: None))
        assert len(result.history) == 2 and np.isfinite(result.test_metrics["mAP"])


def test_a_linear_job_trains_with_the_config_it_is_given(tiny_digits, tmp_path):
    """From Python, TrainJob(mode="linear", train=...) trains with that config (epochs, schedule), not the CLI's."""
    from mlic.config import ModelConfig
    from mlic.data.splits import Splits
    from mlic.engine.job import TrainJob
    from mlic.engine.run import run

    splits, _, _ = tiny_digits
    data = Splits(splits["train"], splits["val"], splits["test"])
    result = run(TrainJob(ModelConfig(num_classes=10, img_size=32), TrainConfig(epochs=3, clip_grad=0.0), data,
                          tmp_path / "a", mode="linear", progress=False, log=lambda *a, **k: None))
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] != lrs[-1]  # TrainConfig's own OneCycle schedule, applied to the probe's steps
    with pytest.raises(ValueError, match="ema: not used by the linear probe"):
        run(TrainJob(ModelConfig(num_classes=10, img_size=32), TrainConfig(epochs=1, ema=0.9, clip_grad=0.0), data,
                     tmp_path / "b", mode="linear", progress=False, log=lambda *a, **k: None))
