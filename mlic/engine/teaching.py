"""A frozen teacher in the training loop: its pseudo-labels handed to the loss, on one of two schedules.

- ``teacher_cache=True``: before training, one no-grad pass of the teacher over the training set (views without
  random flips) gives ``pl_all`` (N, K) int8; ``loss.set_pseudo_labels(pl_all)``. The loss keeps it as a buffer, so
  it is saved with the resume state (a resumed run does not pass again).
- ``teacher_cache=False`` (the official schedule of VLPL and AEVLP): every training step, the teacher scores that
  step's own views and the batch's rows of the pseudo-labels are replaced before the loss reads them.

The teacher is never part of the student: it is not in the optimiser, not in DDP, not in any checkpoint; it runs
under ``torch.no_grad`` in eval mode, in the dtype given by ``--teacher-arg dtype=float16|bfloat16|float32``.

Without ``--teacher``, a data folder written by ``mlic pseudo-label`` (``train/pseudo_labels.npy`` beside the
LabelSet) supplies the pseudo-labels: to a teacher loss (vlpl, aevlp) as such, to any other loss as extra
positives on unknown entries.

Every ``--teacher-arg`` key (the rest go to the teacher's constructor, e.g. ``config``, ``prompt``, ``quick_gelu``):

- ``kind``: "clip" (default) or "classifier" (an mlic model folder as a stand-in teacher);
- ``rule``: "vlpl" or "aevlp" (default: the loss's, else "vlpl") and the rule's settings (``temperature``,
  ``threshold``, ``partial``; ``eta``, ``top_k``, ``negative_ratio``, ``pseudo_negatives``, ``logit_scale``);
- ``teacher_input``: "vlpl" / "aevlp" (the papers' view makers; default: the rule's) or "clip" (CLIP's own
  preprocessing); ``grid_size`` (4), ``flip`` (AEVLP's per-view flips on the per-step schedule; default True);
- ``text_features``: a ``.npy`` (K, D) file; ``gcn_relation`` (``.npy``), ``gcn_weights`` (a file with
  gc1..3.weight), ``gcn_seed``, ``sparse_topk``, ``reweight_p``: AEVLP's text adapter;
- ``dtype``; ``batch_size`` (of the cached pass, 32).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import torch

from mlic.errors import MlicError

RULE_KEYS = {"vlpl": ("temperature", "threshold", "partial"),
             "aevlp": ("temperature", "eta", "top_k", "threshold", "negative_ratio", "pseudo_negatives",
                       "logit_scale")}
VIEW_KEYS = ("teacher_input", "grid_size", "flip")
OWN_KEYS = ("kind", "rule", "dtype", "batch_size", "text_features", "gcn_relation", "gcn_weights", "gcn_seed",
            "sparse_topk", "reweight_p")
PSEUDO_LABEL_FILE = "pseudo_labels.npy"


class TeacherSetup:
    """A built teacher with its rule and view maker: ``views(...)``, ``score(views)``, ``label(sims, observed)``."""

    def __init__(self, weights: str, args: dict, classes: list[str], rule_default: str, device, student_size: int,
                 mean, std) -> None:
        from mlic.teachers import TEACHERS, build_teacher

        args = dict(args or {})
        kind = args.pop("kind", "clip")
        if kind not in TEACHERS:
            raise MlicError(f"--teacher-arg kind={kind}: choose one of {', '.join(sorted(TEACHERS))}")
        self.rule = args.pop("rule", rule_default)
        if self.rule not in RULE_KEYS:
            raise MlicError(f"--teacher-arg rule={self.rule}: choose one of {', '.join(RULE_KEYS)}")
        self.rule_args = {k: args.pop(k) for k in RULE_KEYS[self.rule] if k in args}
        self.input = args.pop("teacher_input", self.rule)
        self.grid = int(args.pop("grid_size", 4))
        self.flip = bool(args.pop("flip", True))
        self.batch_size = int(args.pop("batch_size", 32))
        dtype = args.pop("dtype", "float32")
        ctor = dict(args)
        for key in list(ctor):
            if key in OWN_KEYS:
                ctor.pop(key)
        ctor_params = inspect.signature(TEACHERS[kind].__init__).parameters
        unknown = sorted(set(ctor) - set(ctor_params))
        if unknown:
            valid = sorted({*OWN_KEYS, *VIEW_KEYS, *RULE_KEYS[self.rule], *ctor_params} - {"self", "weights"})
            raise MlicError(f"--teacher-arg {', '.join(unknown)}: not a teacher setting; valid keys: "
                            f"{', '.join(valid)}")
        if kind == "clip":
            ctor["dtype"] = dtype
            ctor["class_names"] = list(classes)  # with text_features: their row count is checked against it
            if "text_features" in args:
                ctor["text_features"] = torch.from_numpy(np.load(args["text_features"]))
            if "gcn_relation" in args:
                weights_gcn = None
                if "gcn_weights" in args:
                    weights_gcn = torch.load(args["gcn_weights"], map_location="cpu", weights_only=True)
                ctor["text_adapter"] = {"kind": "aevlp_gcn", "relation": args["gcn_relation"],
                                        "sparse_topk": int(args.get("sparse_topk", len(classes))),
                                        "reweight_p": float(args.get("reweight_p", 0.2)), "weights": weights_gcn,
                                        "seed": int(args.get("gcn_seed", 0))}
        else:
            ctor.setdefault("class_names", list(classes))
        if not Path(str(weights)).exists():
            raise MlicError(f"--teacher {weights}: no such file or folder")
        self.teacher = build_teacher(kind, weights=weights, **ctor).to(device)
        num = getattr(self.teacher, "num_classes", None)
        if num is not None and num != len(classes):
            raise MlicError(f"--teacher scores {num} classes but the data has {len(classes)}")
        self.device, self.student_size, self.mean, self.std = device, student_size, mean, std
        self.size = int(getattr(self.teacher, "image_size", None) or student_size)

    def views(self, image, flip: bool = False, generator=None) -> torch.Tensor:
        """(V, 3, S, S) float32 views of one raw image (PIL or uint8 (3, H, W))."""
        from mlic.teachers.views import make_views

        return make_views(self.input, image, self.size, self.student_size, self.grid, flip, generator,
                          *(() if self.input != "vlpl" else (self.mean, self.std)))

    @torch.no_grad()
    def score(self, views: torch.Tensor) -> torch.Tensor:
        """Views (B, V, 3, S, S) -> similarities (B, V, K) float32."""
        b, v = views.shape[:2]
        sims = self.teacher(views.flatten(0, 1).to(self.device))
        return sims.float().view(b, v, -1)

    def label(self, sims: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """Similarities (B, V, K) and observed targets (B, K) -> pseudo-labels (B, K) int8."""
        from mlic.teachers import pseudo_labels

        observed = observed.to(sims.device)
        if self.rule == "vlpl":
            return pseudo_labels("vlpl", sims[:, 0], observed, **self.rule_args)
        return pseudo_labels("aevlp", sims, observed, **self.rule_args)

    @torch.no_grad()
    def step(self, x: torch.Tensor, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor, loss) -> None:
        """The per-step schedule: score this step's views, replace the batch's rows of the loss's pseudo-labels.

        VLPL's view is the student's own tensor ``x`` (flip included); AEVLP's views are cut from the student's
        augmented uint8 ``images`` (the raw image is not in the batch), one flip draw per view.
        """
        from mlic.teachers.views import resize_view

        if self.input == "vlpl":
            views = resize_view(x, self.size)[:, None]
        else:
            views = torch.stack([self.views(img.cpu().contiguous(), flip=self.flip and self.input == "aevlp")
                                 for img in images])
        pl = self.label(self.score(views), targets)
        if hasattr(loss, "update_pseudo_labels"):
            loss.update_pseudo_labels(indices, pl)
        else:  # the protocol's one call: the whole matrix, rows replaced
            self.pl_all[indices.cpu()] = pl.cpu()
            loss.set_pseudo_labels(self.pl_all)


class _ViewData(torch.utils.data.Dataset):
    def __init__(self, labelset, setup: TeacherSetup, rows: np.ndarray) -> None:
        self.labelset, self.setup, self.rows = labelset, setup, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from mlic.data.images import ImageError, decode_image

        row = int(self.rows[i])
        try:
            return self.setup.views(decode_image(self.labelset.path(row))), row, None
        except ImageError as e:
            return None, row, str(e)


def _collate(batch):
    good = [b for b in batch if b[0] is not None]
    views = torch.stack([b[0] for b in good]) if good else None
    return views, torch.tensor([b[1] for b in good], dtype=torch.long), [b[2] for b in batch if b[0] is None]


def teacher_pass(setup: TeacherSetup, labelset, observed, workers: int = 0, progress: bool = False,
                 rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One pass of the teacher over ``labelset`` (views without random flips).

    Returns:
        sims (N, V, K) float32, pseudo-labels (N, K) int8 (rows of unreadable images all 0), the unreadable images'
        messages. Under DDP each rank scores every ``world``-th row and the results are summed over ranks.
    """
    from mlic.progress import progress_bar

    n, k = len(labelset), labelset.num_classes
    rows = np.arange(rank, n, world)
    loader = torch.utils.data.DataLoader(_ViewData(labelset, setup, rows), batch_size=setup.batch_size,
                                         num_workers=workers, collate_fn=_collate)
    sims_all, pl_all, bad = None, torch.zeros(n, k, dtype=torch.int8), []
    observed = torch.from_numpy(np.array(observed, dtype=np.int8))  # a copy: the labels may be a read-only mmap
    with progress_bar(len(loader), "teacher", enabled=progress) as bar:
        for views, idx, errors in loader:
            bad += errors
            if views is not None:
                sims = setup.score(views).cpu()
                if sims_all is None:
                    sims_all = torch.zeros(n, sims.shape[1], sims.shape[2], dtype=torch.float32)
                sims_all[idx] = sims
                pl_all[idx] = setup.label(sims, observed[idx]).cpu()
            bar.advance()
    if sims_all is None:
        sims_all = torch.zeros(n, 1, k, dtype=torch.float32)
    if world > 1:
        sims_all, pl32 = sims_all.to(setup.device), pl_all.to(setup.device, torch.int32)
        torch.distributed.all_reduce(sims_all)
        torch.distributed.all_reduce(pl32)
        sims_all, pl_all = sims_all.cpu(), pl32.to(torch.int8).cpu()
    return sims_all, pl_all, bad


def stored_pseudo_labels(data: Path | None, labelset) -> np.ndarray | None:
    """Pseudo-labels written by ``mlic pseudo-label`` for the training rows of ``labelset`` (matched by image path),
    or None when ``data`` has none."""
    if data is None:
        return None
    from mlic.data.labelset import LabelSet

    data = Path(data)
    folder = data if (data / "labelset.json").exists() else data / "train"
    file = folder / PSEUDO_LABEL_FILE
    if not file.is_file():
        return None
    stored = LabelSet.load(folder)
    pl = np.load(file)
    if pl.shape != (len(stored), stored.num_classes) or stored.classes != labelset.classes:
        raise MlicError(f"{file}: pseudo-labels do not match {folder}'s LabelSet; run mlic pseudo-label again")
    where = {p: i for i, p in enumerate(stored.image_paths)}
    out = np.zeros((len(labelset), labelset.num_classes), dtype=np.int8)
    for i, p in enumerate(labelset.image_paths):
        j = where.get(p)
        if j is not None:
            out[i] = pl[j]
    return out


def with_extra_positives(observed, pl) -> np.ndarray:
    """Training labels with pseudo-positives added where the label is unknown: (N, K) int8."""
    if hasattr(observed, "by_class"):
        raise MlicError("pseudo-labels as extra positives need dense labels; this training set's are sparse")
    observed = np.asarray(observed)
    return np.where((observed == -1) & (np.asarray(pl) == 1), 1, observed).astype(np.int8)


def setup_teaching(job, train_set, loss, device, say=print, rank: int = 0, world: int = 1,
                   per_step: bool = True) -> TeacherSetup | None:
    """Give ``loss`` its pseudo-labels as ``job`` asks; returns the per-step teacher (``teacher_cache=False``),
    else None. Called once, right after the loss is built (both modes; ``per_step=False`` where batches are cached
    features, not images).

    Raises:
        MlicError: a loss that needs pseudo-labels without a teacher (the option to add), or teacher settings that
            cannot work; one line.
    """
    teacher = getattr(job, "teacher", None)
    needs = bool(getattr(loss, "needs_teacher", False))
    takes = hasattr(loss, "set_pseudo_labels")
    name = getattr(job.train, "loss", "")
    if teacher is None:
        stored = stored_pseudo_labels(getattr(job, "data", None), train_set)
        if stored is None:
            if needs:
                raise MlicError(f"--loss {name} needs pseudo-labels from a teacher: add --teacher <CLIP weights, e.g. "
                                "ViT-B-16.pt> (or --data a folder written by mlic pseudo-label)")
            return None
        if needs or takes:
            loss.set_pseudo_labels(torch.from_numpy(stored))
        else:
            train_set.observed = with_extra_positives(train_set.train_targets, stored)
        say(f"pseudo-labels: {int((stored == 1).sum())} pseudo-positives stored with the data"
            f"{'' if needs or takes else ', added as positives on unknown entries'}")
        return None
    rule_default = getattr(loss, "rule", "") or "vlpl"
    setup = TeacherSetup(teacher, getattr(job, "teacher_args", None) or {}, train_set.classes, rule_default, device,
                         job.model.img_size, job.model.mean, job.model.std)
    if not getattr(job, "teacher_cache", True):
        if not per_step:
            raise MlicError("--no-teacher-cache needs image batches; --mode linear trains on cached features: use "
                            "--teacher-cache")
        if not takes:
            raise MlicError(f"--no-teacher-cache relabels every step, which --loss {name} cannot take; use "
                            "--teacher-cache (pseudo-labels as extra positives) or --loss vlpl / aevlp")
        setup.pl_all = torch.zeros(len(train_set), train_set.num_classes, dtype=torch.int8)
        loss.set_pseudo_labels(setup.pl_all)
        say(f"teacher: {Path(str(teacher)).name}, rule {setup.rule}, views '{setup.input}', every step")
        return setup
    if job.resume and takes:
        say("teacher: pseudo-labels come from the resume state")
        return None
    if getattr(job.splits, "shards", {}).get("train") is not None:
        raise MlicError("--teacher-cache reads the training images from their files; with shards use "
                        "--no-teacher-cache, or train from the prepared folder")
    start = time.perf_counter()
    _, pl, bad = teacher_pass(setup, train_set, train_set.train_targets, workers=job.train.workers or 0,
                              progress=job.progress, rank=rank, world=world)
    if bad:
        say(f"teacher: {len(bad)} unreadable training images get no pseudo-labels, e.g. {bad[0]}")
    if takes:
        loss.set_pseudo_labels(pl)
    else:
        train_set.observed = with_extra_positives(train_set.train_targets, pl.numpy())
    say(f"teacher: {Path(str(teacher)).name}, rule {setup.rule}, views '{setup.input}': "
        f"{int((pl == 1).sum())} pseudo-positives over {len(train_set)} images in {time.perf_counter() - start:.1f}s")
    return None


def pseudo_label_quality(pl: np.ndarray, clean) -> dict[str, np.ndarray]:
    """Per class: pseudo-positives, their precision and recall against ``clean`` (N, K) labels (NaN when undefined)."""
    pos, truth = np.asarray(pl) == 1, np.asarray(clean) == 1
    hits = (pos & truth).sum(0).astype(float)
    made, real = pos.sum(0).astype(float), truth.sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"positives": pos.sum(0), "precision": np.where(made > 0, hits / made, np.nan),
                "recall": np.where(real > 0, hits / real, np.nan)}


def pseudo_label_data(data: str | Path, teacher: str | Path, out: str | Path, rule: str = "aevlp",
                      prompt: str | None = None, teacher_args: dict | None = None, img_size: int = 448,
                      device: str | None = None, workers: int = 0, progress: bool = True, say=print) -> dict:
    """``mlic pseudo-label``: every split of a prepared folder scored by a teacher, written to ``out`` as a whole.

    ``out/<split>/`` holds the LabelSet (images stay where they are), ``teacher_sims.npy`` ((N, K), or (N, V, K)
    with AEVLP's views), ``pseudo_labels.npy`` ((N, K) int8) and ``pseudo_labels.json`` (teacher, rule, settings,
    per-class counts, and precision / recall where the split's labels are complete). Class names come from the
    data; ``prompt`` is the template ("a photo of a {}.").

    Returns:
        {split: {"positives", "precision", "recall"}} per class (precision / recall None without clean labels).
    """
    import json

    from mlic.data.splits import load_prepared
    from mlic.io import atomic_save_npy, atomic_write_bytes, check_writable, folder_swap

    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve():
        raise MlicError(f"--out {out}: write the pseudo-labelled copy to a new folder, not over --data")
    from mlic.data.prepare import check_replaceable

    found = load_prepared(data)
    check_replaceable(out)  # replaced as a whole: only a folder of LabelSets, never a user's folder
    check_writable(out.parent if out.parent != Path("") else Path("."), "--out")
    args = dict(teacher_args or {})
    args["rule"] = rule
    if prompt is not None:
        args["prompt"] = prompt
    classes = next(iter(found.values())).classes
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup = TeacherSetup(str(teacher), args, classes, rule, dev, img_size,
                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    report = {}
    single = (data / "labelset.json").exists()
    with folder_swap(out) as tmp:
        for split, ls in found.items():
            sims, pl, bad = teacher_pass(setup, ls, ls.train_targets, workers=workers, progress=progress)
            if bad:
                say(f"{split}: {len(bad)} unreadable images get no pseudo-labels, e.g. {bad[0]}")
            folder = tmp if single else tmp / split
            ls.save(folder)
            atomic_save_npy(folder / "teacher_sims.npy", (sims[:, 0] if sims.shape[1] == 1 else sims).numpy())
            atomic_save_npy(folder / PSEUDO_LABEL_FILE, pl.numpy())
            targets = np.asarray(ls.targets)
            clean = not ls.sparse and not (targets == -1).any()
            quality = pseudo_label_quality(pl.numpy(), targets if clean else np.zeros_like(targets))
            if not clean:
                quality["precision"] = quality["recall"] = None
            report[split] = quality
            meta = {"teacher": str(teacher), "rule": setup.rule, "rule_args": setup.rule_args,
                    "teacher_input": setup.input, "grid_size": setup.grid, "prompt": prompt,
                    "classes": ls.classes, "pseudo_positives_per_class": quality["positives"].tolist(),
                    "unreadable_images": len(bad)}
            if clean:
                meta["precision_per_class"] = [None if np.isnan(v) else float(v) for v in quality["precision"]]
                meta["recall_per_class"] = [None if np.isnan(v) else float(v) for v in quality["recall"]]
            atomic_write_bytes(folder / "pseudo_labels.json", json.dumps(meta, indent=1).encode())
    return report


def check_teacher_options(loss: str, loss_args: dict | None, teacher, teacher_cache: bool, data, mode: str) -> None:
    """Refuse, before any work (make_job, before the run folder is claimed), teacher options that cannot run: a loss
    that needs pseudo-labels without ``--teacher`` nor pseudo-labelled ``--data``, per-step teaching of a loss that
    cannot take pseudo-labels or in ``--mode linear``. One line naming the option to add."""
    from mlic.registry import get_loss

    cls = get_loss(loss.lower().replace("-", "_"))
    needs = bool(getattr(cls, "needs_teacher", False)) and (loss_args or {}).get("use_pl", True) is not False
    stored = data is not None and any((Path(data) / sub / PSEUDO_LABEL_FILE).is_file() for sub in ("", "train"))
    if needs and teacher is None and not stored:
        raise MlicError(f"--loss {loss} needs pseudo-labels from a teacher: add --teacher <CLIP weights, e.g. "
                        "ViT-B-16.pt> (or --data a folder written by mlic pseudo-label)")
    if teacher is not None and not teacher_cache:
        if mode == "linear":
            raise MlicError("--no-teacher-cache needs image batches; --mode linear trains on cached features: use "
                            "--teacher-cache")
        if not hasattr(cls, "set_pseudo_labels"):
            raise MlicError(f"--no-teacher-cache relabels every step, which --loss {loss} cannot take; use "
                            "--teacher-cache (pseudo-labels as extra positives) or --loss vlpl / aevlp")
    if teacher is not None and not Path(str(teacher)).exists():
        raise MlicError(f"--teacher {teacher}: no such file or folder")
