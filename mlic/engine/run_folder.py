"""Claiming an output folder: one writer, no earlier run replaced by surprise, no user file touched.

A run folder records in ``.mlic-run.json`` (:data:`MANIFEST`) which of :data:`RUN_FILES` its run wrote:
what ``--overwrite`` may remove, and nothing else. A folder receiving a converted model must be new,
empty or an mlic model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlic.engine.checkpoint import CheckpointError, read_model_meta
from mlic.io import check_writable, track_writes

RUN_FILES = ("model.safetensors", "model.json", "last.pt", "metrics.jsonl", "test_metrics.json", "test_scores.npy",
             "report.md", "training.png", "per_class_ap.png", "pr_curves.png", "estimated_labels.npy", "features",
             "loss.safetensors", "linear")
"""What a run writes into its folder: a folder holding model.json, last.pt or metrics.jsonl holds a run."""

MANIFEST = ".mlic-run.json"
"""Which of :data:`RUN_FILES` the run in a folder wrote: what ``--overwrite`` may remove, and nothing else."""


def read_manifest(out: Path) -> set[str] | None:
    """The names the run in ``out`` owns, or None for a folder without a manifest."""
    try:
        names = json.loads((out / MANIFEST).read_bytes())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # plain names only: a tampered manifest must not point --overwrite outside the folder
    return {n for n in names if isinstance(n, str) and n and "/" not in n and "\\" not in n and not n.startswith(".")}


def claim_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``out`` ready for a run: one writer, no earlier run replaced by surprise, no user file touched.

    Takes the folder's one-writer lock (held until the process ends), removes the temporary files of
    killed writes, and records in ``.mlic-run.json`` which of :data:`RUN_FILES` this run writes. A folder
    that holds a run (model.json, last.pt or metrics.jsonl) is continued with ``resume``, or cleared with
    ``overwrite`` of the files its manifest lists (nothing else). A file or folder that a run would write
    but that no run of mlic wrote (a user's ``features/``) is never replaced: the claim is refused.

    Raises:
        CheckpointError: ``out`` holds a run and neither option was given, or holds a foreign entry.
        OutputError: another process is writing ``out`` (the message names it).
        OSError: ``out`` cannot be created or written (checked with a real write, before any training).
    """
    import shutil

    from mlic.io import remove_stale_all
    from mlic.outputs import lock_folder

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: --out is a file; give a folder for the run")
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite contradict each other; choose one")
    check_writable(out, "--out")
    lock_folder(out)
    for folder in (out, out / "linear"):
        remove_stale_all(folder)
    holds_run = any((out / name).exists() for name in ("model.json", "last.pt", "metrics.jsonl"))
    owned = read_manifest(out)
    if holds_run and not resume and not overwrite:
        raise CheckpointError(f"{out}: holds a run already; continue it with --resume, replace it with "
                              "--overwrite, or choose another --out")
    if owned is None and holds_run:  # a run from before manifests: its files are the run's, folders unknown
        owned = {n for n in RUN_FILES if (out / n).is_file() or (resume and (out / n).exists())}
    owned = owned or set()
    if overwrite and holds_run:
        for name in sorted(owned):
            target = out / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
        owned = set()
    foreign = [n for n in RUN_FILES if (out / n).exists() and n not in owned]
    if foreign:
        listed = ", ".join(n + ("/" if (out / n).is_dir() else "") for n in foreign[:3])
        raise CheckpointError(f"{out}: holds {listed}, not written by a run of mlic, where this run would write; "
                              "move them or choose another --out")
    track_writes(out, MANIFEST, owned)
    return out


def claim_model_dir(out_dir: str | Path) -> Path:
    """Make ``out_dir`` ready to receive a converted model: it must be new, empty or an mlic model folder.

    Raises:
        CheckpointError: ``out_dir`` is a file, or holds a model.json / model.safetensors that mlic did not write.
    """
    from mlic.outputs import lock_folder

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"-o {out_dir}: is a file; give a folder for the model")
    if (out_dir / "model.json").exists():
        try:
            read_model_meta(out_dir)
        except CheckpointError:
            raise CheckpointError(f"-o {out_dir}: holds a model.json that mlic did not write; choose another "
                                  "folder") from None
    elif (out_dir / "model.safetensors").exists():
        raise CheckpointError(f"-o {out_dir}: holds a model.safetensors without its model.json; choose another folder")
    check_writable(out_dir, "-o")
    lock_folder(out_dir, "-o")
    return out_dir
