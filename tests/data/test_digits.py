import numpy as np

from mlic.data.digits import CLASSES, DigitsSpec, build_multidigits, split_scans


def test_build_is_cached_and_valid(tiny_digits):
    splits, cache, spec = tiny_digits
    assert set(splits) == {"train", "val", "test"}
    assert len(splits["train"]) == spec.train and splits["train"].classes == CLASSES
    t = np.asarray(splits["train"].targets)
    assert t.min() == 0 and t.max() == 1
    assert 1 <= t.sum(1).min() and t.sum(1).max() <= 4
    from PIL import Image

    img = Image.open(splits["test"].path(0))
    assert img.size == (32, 32) and img.mode == "RGB"
    again = build_multidigits(cache, spec)  # reuses the folder
    assert again["train"].root == splits["train"].root


def test_deterministic_given_seed(tmp_path):
    spec = DigitsSpec(train=20, val=5, test=5, img_size=32, seed=11)
    a = build_multidigits(tmp_path / "a", spec)
    b = build_multidigits(tmp_path / "b", spec)
    np.testing.assert_array_equal(a["train"].targets, b["train"].targets)
    assert a["val"].path(3).read_bytes() == b["val"].path(3).read_bytes()
    c = build_multidigits(tmp_path / "c", DigitsSpec(train=20, val=5, test=5, img_size=32, seed=12))
    assert not np.array_equal(a["train"].targets, c["train"].targets)


def test_splits_use_disjoint_scans():
    labels = np.repeat(np.arange(10), 30)
    parts = split_scans(labels, np.random.RandomState(0))
    sets = [set(v.tolist()) for v in parts.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == len(labels)


def test_imbalance_and_co_occurrence(tmp_path):
    t = np.asarray(build_multidigits(tmp_path, DigitsSpec(train=600, val=5, test=5, img_size=32))["train"].targets)
    freq = t.mean(0)
    assert freq.max() / freq.min() > 3
    p8_given_3 = t[t[:, 3] == 1, 8].mean()
    assert p8_given_3 > 2 * t[t[:, 3] == 0, 8].mean()


def test_a_killed_build_leaves_nothing_behind_on_the_next_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys; from mlic.data.digits import DigitsSpec, build_multidigits; "
            "build_multidigits(sys.argv[1], DigitsSpec(train=3000, val=200, test=200, img_size=32, seed=5))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    deadline = time.time() + 120
    while not list(tmp_path.glob(".multidigits-*.tmp/images/train/*.png")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".multidigits-*.tmp")), "the build was killed before it started"
    splits = build_multidigits(tmp_path, DigitsSpec(train=3000, val=200, test=200, img_size=32, seed=5))
    assert len(splits["train"]) == 3000
    assert [p.name for p in tmp_path.iterdir()] == [f"multidigits-{DigitsSpec(3000, 200, 200, 32, 5).key()}"]
