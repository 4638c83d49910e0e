"""Streaming shards: the same rows as ImageDataset, rank/worker split, seeded shuffling, damaged shards."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlic.data.images import ImageDataset, build_transform, collate
from mlic.data.shards import ShardDataset, ShardError, write_shards

SIZE = 64
N, K = 12, 5  # conftest's make_labelset


def test_same_rows_as_image_dataset(packed, rows):
    labelset, out, _ = packed
    transform = build_transform(SIZE, train=False)
    folder = ImageDataset(labelset, transform)
    streamed = rows(ShardDataset(out, transform, shuffle=False))
    assert sorted(streamed) == list(range(N))
    for i, (image, target, error) in streamed.items():
        ref_image, ref_target, ref_index, ref_error = folder[i]
        assert error is None and ref_error is None and ref_index == i
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
        assert torch.equal(image, ref_image) and torch.equal(target, ref_target) and target.dtype == torch.int8
    clean = rows(ShardDataset(out, transform, targets="clean", shuffle=False))
    for i, (_, target, _) in clean.items():
        np.testing.assert_array_equal(target.numpy(), labelset.targets[i])
    # training: each sample's augmentation runs under its own seed, as ImageDataset[(row, seed)] does
    train = build_transform(SIZE, train=True, augment="light")
    streamed = ShardDataset(out, train, seed=5, buffer=4)
    streamed.set_epoch(2)
    folder = ImageDataset(labelset, train)
    drawn = rows(streamed)
    for i, (image, _, _) in drawn.items():
        assert torch.equal(image, folder[(i, streamed.sample_seed(i))][0])
    assert any(not torch.equal(image, ImageDataset(labelset, transform)[i][0]) for i, (image, _, _) in drawn.items())
    # the same draws whatever the rank/worker split
    halves = [ShardDataset(out, train, seed=5, buffer=4, rank=r, world_size=2) for r in range(2)]
    for half in halves:
        half.set_epoch(2)
        assert all(torch.equal(image, drawn[i][0]) for i, (image, _, _) in rows(half).items())


def test_sparse_targets_and_collate(tmp_path, make_labelset):
    labelset = make_labelset(tmp_path / "data", sparse=True)
    write_shards(labelset, tmp_path / "out", 10**9, progress=False)
    dataset = ShardDataset(tmp_path / "out", build_transform(SIZE, train=False), seed=1)
    images, targets, indices, errors = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate)))
    assert images.shape == (5, 3, SIZE, SIZE) and targets.shape == (5, K) and errors == []
    np.testing.assert_array_equal(targets.numpy(), labelset.observed[indices.numpy()])


def test_every_sample_once_across_ranks_and_workers(packed):
    """2 simulated DDP ranks x 2 DataLoader workers, 2 epochs: each sample once per epoch, ranks disjoint."""
    _, out, shards = packed
    transform = build_transform(SIZE, train=False)
    datasets = [ShardDataset(out, transform, seed=7, rank=rank, world_size=2, buffer=4) for rank in range(2)]
    loaders = [DataLoader(d, batch_size=2, num_workers=2, collate_fn=collate, persistent_workers=True)
               for d in datasets]
    assignments = []
    for epoch in range(2):
        per_rank = []
        for dataset, loader in zip(datasets, loaders):
            dataset.set_epoch(epoch)
            batches = list(loader)
            got = [int(i) for _, _, idx, _ in batches for i in idx]
            assert len(got) == len(dataset) and len(batches) == dataset.num_batches(2, num_workers=2)
            assert dataset.num_batches(2, num_workers=2) == datasets[0].num_batches(2, 2, rank=dataset.rank)
            per_rank.append(got)
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N)) and all(per_rank)
    for epoch in range(6):  # shards move between ranks from epoch to epoch (seeded)
        datasets[0].set_epoch(epoch)
        assignments.append(datasets[0].shards_for(0))
    assert len({tuple(sorted(a)) for a in assignments}) > 1


def test_persistent_workers_follow_set_epoch(packed):
    _, out, _ = packed
    dataset = ShardDataset(out, build_transform(SIZE, train=False), seed=7, buffer=4)
    loader = DataLoader(dataset, batch_size=N, num_workers=1, collate_fn=collate, persistent_workers=True)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append([int(i) for _, _, idx, _ in loader for i in idx])
    single = ShardDataset(out, build_transform(SIZE, train=False), seed=7, buffer=4)
    single.set_epoch(1)
    assert orders[0] == orders[2] != orders[1]
    assert orders[1] == [int(r[2]) for r in single]  # a worker reads what the main process would


def test_shuffle_is_seeded_and_changes_with_epoch(packed):
    _, out, _ = packed
    transform = build_transform(SIZE, train=False)

    def order(seed, epoch):
        dataset = ShardDataset(out, transform, seed=seed, buffer=5)
        dataset.set_epoch(epoch)
        return [index for _, _, index, _ in dataset]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(N))
    assert [i for _, _, i, _ in ShardDataset(out, transform, shuffle=False)] == list(range(N))


def test_rank_and_world_from_torchrun_variables(packed, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dataset = ShardDataset(packed[1], build_transform(SIZE, train=False))
    assert (dataset.rank, dataset.world_size) == (1, 2)
    other = ShardDataset(packed[1], build_transform(SIZE, train=False), rank=0, world_size=2)
    assert len(dataset) + len(other) == N
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardDataset(packed[1], build_transform(SIZE, train=False), rank=2)


def test_fewer_shards_than_ranks_or_workers(tmp_path, packed):
    labelset = packed[0]
    write_shards(labelset, tmp_path / "one", 10**9, progress=False)
    transform = build_transform(SIZE, train=False)
    with pytest.raises(ShardError, match="1 shards for 2 ranks.*--shard-size"):
        ShardDataset(tmp_path / "one", transform, rank=0, world_size=2)
    dataset = ShardDataset(tmp_path / "one", transform, buffer=3)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate)
    assert sorted(int(i) for _, _, idx, _ in loader for i in idx) == list(range(N))  # worker 1 reads nothing
    assert dataset.num_batches(4, num_workers=2) == 3


def test_truncated_shard_is_a_clear_error(packed, tmp_path):
    _, out, shards = packed
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in [out / "index.json", *shards]:
        (broken / p.name).write_bytes(p.read_bytes())
    data = shards[1].read_bytes()
    (broken / shards[1].name).write_bytes(data[: len(data) // 2])
    dataset = ShardDataset(broken, build_transform(SIZE, train=False), shuffle=False)
    with pytest.raises(ShardError, match=rf"{shards[1].name}: truncated or corrupt.*mlic prepare shards"):
        list(dataset)
    # cut at a member boundary: the end-of-archive marker is missing
    with tarfile.open(shards[1]) as tar:
        members = tar.getmembers()
    (broken / shards[1].name).write_bytes(data[: members[2].offset])
    with pytest.raises(ShardError, match=rf"{shards[1].name}: truncated or corrupt after \d+ of \d+ samples \(no end"):
        list(dataset)
    # a whole tar with fewer samples than index.json lists
    with tarfile.open(broken / shards[1].name, "w") as tar:
        with tarfile.open(shards[1]) as source:
            for member in source.getmembers()[:2]:
                tar.addfile(member, source.extractfile(member))
    with pytest.raises(ShardError, match=rf"{shards[1].name}: holds 1 samples but index.json lists"):
        list(dataset)
    # a damaged header
    damaged = bytearray(data)
    damaged[members[2].offset + 10] ^= 0xFF
    (broken / shards[1].name).write_bytes(bytes(damaged))
    with pytest.raises(ShardError, match=r"truncated or corrupt after \d+ of .*bad header checksum"):
        list(dataset)
    (broken / shards[1].name).write_bytes(data[: members[2].offset])
    # and the error arrives as one line through a DataLoader worker
    batches = iter(DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate))
    with pytest.raises(ShardError) as caught:
        list(batches)
    batches._shutdown_workers()  # now, not when the garbage collector gets to it (seconds later, in another test)
    assert "\n" not in str(caught.value) and shards[1].name in str(caught.value)


def test_missing_label_entry_is_a_clear_error(packed, tmp_path):
    _, out, shards = packed
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_bytes((out / "index.json").read_bytes())
    for p in shards:
        (broken / p.name).write_bytes(p.read_bytes())
    with tarfile.open(shards[0]) as source, tarfile.open(broken / shards[0].name, "w") as target:
        members = source.getmembers()
        key = members[0].name.split(".")[0]
        for member in members:
            if member.name != f"{key}.labels.json":  # the first sample loses its labels
                target.addfile(member, source.extractfile(member))
    with pytest.raises(ShardError, match=rf"{shards[0].name}: sample {key} has no labels entry"):
        list(ShardDataset(broken, build_transform(SIZE, train=False), shuffle=False))


def test_undecodable_image_inside_a_shard_is_a_counted_row(tmp_path, make_labelset, rows):
    labelset = make_labelset(tmp_path / "data", observed=False)
    data = labelset.path(0).read_bytes()
    labelset.path(0).write_bytes(data[: len(data) // 3])  # a truncated JPEG: header fine, body not
    write_shards(labelset, tmp_path / "out", 10**9, progress=False)
    got = rows(ShardDataset(tmp_path / "out", build_transform(SIZE, train=False), shuffle=False))
    image, target, error = got[0]
    assert image is None and "shard-000000.tar:img/00.jpg" in error and target.shape == (K,)
    images, _, indices, errors = collate([(image, target, 0, error)] + [(*got[1][:2], 1, None)])
    assert indices.tolist() == [1] and errors == [error]
