"""Which data a command uses: MultiDigits by default or a prepared folder; observation, hold-out, test.

``train`` and ``eval`` both choose their data here, so they agree on what a prepared folder means:
LabelSet folders ``train/`` [``val/``] [``test/``]; without ``test/``, ``val/`` is the test set (as
COCO's val2014 is in the papers) and validation is a share of train held out with Cole et al.'s
``RandomState(1200)`` permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlic.data.labelset import LabelSet, LabelSetError
from mlic.errors import MlicError


@dataclass
class Splits:
    """The LabelSets of one training job; ``train`` carries the observed labels it learns from.

    ``shards`` maps a split to the WebDataset shards its images stream from (:class:`mlic.data.shards.ShardIndex`);
    a split without an entry reads its images from the LabelSet's files.
    """

    train: LabelSet
    val: LabelSet
    test: LabelSet | None
    shards: dict = field(default_factory=dict)


def parse_digits_size(text: str | None):
    """``--digits-size TRAIN,VAL,TEST`` -> DigitsSpec (the default spec when None)."""
    from mlic.data.digits import DigitsSpec

    if not text:
        return DigitsSpec()
    try:
        n_train, n_val, n_test = (int(v) for v in text.split(","))
    except ValueError:
        raise MlicError(f"--digits-size {text!r}: write TRAIN,VAL,TEST, e.g. 4000,1000,2000") from None
    if min(n_train, n_val, n_test) < 1:
        raise MlicError(f"--digits-size {text!r}: every split needs at least one image")
    return DigitsSpec(train=n_train, val=n_val, test=n_test)


def load_prepared(data: Path) -> dict[str, LabelSet]:
    """The LabelSets of a prepared folder, a shard folder (the labels packed beside the shards), or one
    LabelSet folder (as {"train": ...})."""
    from mlic.data.shards import is_shards, open_data

    if data.is_dir() and is_shards(data):
        return {split: index.labelset() for split, index in open_data(data).items()}
    if not data.is_dir():
        raise LabelSetError(f"{data}: no such folder; make one with 'mlic prepare' (or omit --data for MultiDigits)")
    if (data / "labelset.json").exists():
        return {"train": LabelSet.load(data)}
    found = {s: LabelSet.load(data / s) for s in ("train", "val", "test") if (data / s / "labelset.json").exists()}
    if not found:
        raise LabelSetError(f"{data}: no train/, val/ or test/ LabelSet inside; prepare the data with 'mlic prepare'")
    return found


def training_splits(data: Path | None, observe: str | None = None, observe_seed: int = 1200,
                    val_fraction: float = 0.2, digits_size: str | None = None, echo=print) -> Splits:
    """The (train, val, test) LabelSets a training job uses.

    Args:
        data: a prepared folder or a shard folder (``mlic prepare shards``: images stream from the shards);
            None builds MultiDigits (``digits_size`` sets its size).
        observe: simulate incomplete train labels ("single-positive", "partial:P"), drawn on the whole
            training split before any hold-out, as Cole et al. do.
        observe_seed: seed of that draw.
        val_fraction: share of train held out for validation when the data has no val/.
        echo: where to say what was chosen.
    """
    from mlic.data.observe import observe as apply_observation
    from mlic.data.shards import is_shards, open_data

    shards = {}
    if data is None:
        from mlic.data.digits import build_multidigits

        spec = parse_digits_size(digits_size)
        echo(f"data: MultiDigits (train {spec.train}, val {spec.val}, test {spec.test}; built once into the cache)")
        built = build_multidigits(spec=spec)
        train_set, val_set, test_set = built["train"], built["val"], built["test"]
    else:
        found = load_prepared(data)
        if is_shards(data):
            shards = open_data(data)
            echo(f"data: streaming {', '.join(f'{s} ({len(i.shards)} shards)' for s, i in shards.items())} "
                 f"from {data}")
        if "train" not in found:
            raise LabelSetError(f"{data}: no train/ LabelSet inside; prepare the data with 'mlic prepare'")
        train_set, val_set, test_set = found["train"], found.get("val"), found.get("test")
        if test_set is None and val_set is not None:
            test_set, val_set = val_set, None
            if "val" in shards:
                shards["test"] = shards.pop("val")
        for other in (val_set, test_set):
            if other is not None and other.classes != train_set.classes:
                raise LabelSetError(f"{data}: the splits have different classes; prepare them together")
    if observe:
        observed = apply_observation(np.asarray(train_set.targets), observe, observe_seed)
        train_set = train_set.with_observed(observed)
        echo(f"labels: {observe} observation of train (seed {observe_seed}): "
             f"{(observed == 1).sum(1).mean():.2f} positives and {(observed == 0).sum(1).mean():.2f} negatives "
             "known per image")
    elif train_set.observed is not None:
        echo("labels: using the observed labels stored with the data")
    if val_set is None:
        if shards:
            raise LabelSetError(f"{data}: shards need their own val/ split (a hold-out would renumber the rows the "
                                "shards carry); prepare the data with a val/ split, then 'mlic prepare shards'")
        train_set, val_set = train_set.hold_out(val_fraction, 1200)
        echo(f"data: validation = {len(val_set)} images held out of train (RandomState(1200), as Cole et al.)")
    return Splits(train_set, val_set, test_set, shards)


def evaluation_split(data: Path | None, split: str = "test") -> LabelSet:
    """The LabelSet ``mlic eval`` scores: MultiDigits' test split by default, else ``split`` of a prepared
    folder (its val/ when it has no test/, as COCO's val2014 serves as test), or a LabelSet folder itself."""
    if data is None:
        from mlic.data.digits import build_multidigits

        return build_multidigits()["test"]
    if (data / "labelset.json").exists():
        return LabelSet.load(data)
    found = load_prepared(data)
    if split not in found:
        if split == "test" and "val" in found:
            return found["val"]
        raise LabelSetError(f"{data / split}: no LabelSet there; pass --split or a prepared folder")
    return found[split]
