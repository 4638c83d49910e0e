"""``mlic sweep``: a paper's protocol grid on Ray Tune, from one machine to a cluster; a trial is one ``mlic.train``.

A sweep file names the base options (any :func:`mlic.train` keyword), the grid axes, the selection rule and
the resources of one trial::

    base: {mode: linear, observe: single-positive, epochs: 25}
    grid: {loss: [an, role, gr], lr: [1.0e-3, 1.0e-2], batch_size: [16, 64], seed: [0, 1, 2]}
    select: {metric: val_mAP, over: [lr, batch_size], mean_over: seed}
    report: test_mAP
    resources: {cpus: 1, gpus: 0}
    max_concurrent: 2

An axis value may be a dict of options (``- {loss: ll_r, loss_args: {delta_rel: 3}}``; an optional ``label``
names its row). ``exclude`` lists partial option dicts: a trial matching every entry of one is left out.
``retries`` (default 2) is how often Ray retries a failed trial.

Cole et al.'s selection rule (:func:`select`): for each value of the remaining axes (not in ``over`` nor
``mean_over``), the setting of ``over`` with the best ``metric`` averaged over ``mean_over``; its ``report``
values give mean ± std (ddof 1) and n. ``select: {choose: each}`` picks the best setting for each value of
``mean_over`` on its own instead (a grid search per seed, as the README's MultiDigits table was made).

The output folder::

    sweep.yaml             the sweep file, as run (``--resume`` and ``--report`` read it)
    trials/NAME/           one ordinary mlic run folder per trial (TensorBoard event files in it), and
    trials/NAME/trial.json    its row, written when it finished: a finished trial is never run again
    logs/NAME.log          the trial's lines
    features/KEY/          the feature cache shared by the linear probes of one backbone, data and transform
    ray/                   Ray Tune's experiment state and per-trial result files
    trials/NAME/error.json    the error line of a trial that failed in its own code (reported once, not retried)
    results.jsonl          one row per finished trial; table.csv, table.md, val_mAP.png: the selected table

A trial that was killed (its worker or node died) is retried by Ray (``FailureConfig``, ``retries`` times) and
continues from its own ``last.pt`` (mlic's exact resume) when it has one; a linear probe reruns from the shared
feature cache. A trial whose own code raises fails the same way every time: it is reported once with its error
line, the sweep goes on, and the table lists it as failed; ``--resume`` tries it again. ``--extend`` takes a sweep
file with added grid values into a sweep folder (the trials there must keep their options). On a cluster
(``--address``), ``--out`` must be a folder every node sees (a shared file system), as the data and weights are.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mlic.errors import MlicError

SWEEP_KEYS = ("description", "base", "grid", "exclude", "select", "report", "resources", "max_concurrent", "retries")
SELECT_KEYS = ("metric", "over", "mean_over", "choose")
CHOOSE = ("mean", "each")
RESOURCE_KEYS = ("cpus", "gpus")
SET_BY_SWEEP = ("out", "resume", "overwrite", "log", "log_to", "features_dir", "quiet")
"""mlic.train keywords the sweep sets for every trial."""
PATH_OPTIONS = ("data", "pretrained", "recipe", "init_from", "teacher")
"""Options naming files: made absolute where the sweep starts (Ray runs trials in other folders)."""
METRICS = ("val_mAP", "test_mAP")
INSTALL = "pip install -e '.[sweep]'"


class SweepError(MlicError):
    """A sweep file or folder that cannot be run; the message names the field and the fix."""


def train_keywords() -> list[str]:
    """Every keyword :func:`mlic.train` takes (those of :func:`mlic.engine.job.make_job`)."""
    import inspect

    from mlic.engine.job import make_job

    return list(inspect.signature(make_job).parameters)


@dataclass
class Sweep:
    """A sweep file, checked."""

    base: dict
    """Options of every trial."""
    grid: dict[str, list]
    """Axis -> its values (option values, or dicts of options)."""
    over: list[str]
    """Axes chosen per row of the table by ``metric``."""
    mean_over: str | None = None
    """The axis ``metric`` and ``report`` are averaged over (the seeds)."""
    metric: str = "val_mAP"
    report: str = "test_mAP"
    cpus: float = 1
    gpus: float = 0
    max_concurrent: int | None = None
    retries: int = 2
    exclude: list[dict] = field(default_factory=list)
    description: str = ""
    choose: str = "mean"
    """``mean``: one ``over`` setting per row, the best ``metric`` averaged over ``mean_over`` (Cole et al.);
    ``each``: the best setting for each value of ``mean_over`` on its own (a grid search per seed)."""

    @property
    def rows(self) -> list[str]:
        """The remaining axes: one table row per combination of their values."""
        return [a for a in self.grid if a not in self.over and a != self.mean_over]


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def check_options(options: dict, where: str, valid: list[str]) -> None:
    """Refuse keywords mlic.train does not take, and those the sweep sets itself."""
    if not isinstance(options, dict):
        raise SweepError(f"{where}: give a mapping of mlic.train keywords, e.g. {{loss: an, lr: 1.0e-3}}")
    unknown = sorted(set(options) - set(valid) - {"label"})
    if unknown:
        raise SweepError(f"{where}: unknown mlic.train keyword(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(k for k in valid if k not in SET_BY_SWEEP)}")
    owned = sorted(set(options) & set(SET_BY_SWEEP))
    if owned:
        raise SweepError(f"{where}: {', '.join(owned)} is set by mlic sweep for every trial; drop it")


def parse_sweep(spec: dict, source: str = "sweep") -> Sweep:
    """Check a sweep file's mapping and turn it into a :class:`Sweep`.

    Raises:
        SweepError: an unknown key, an unknown mlic.train keyword in ``base`` or ``grid``, a selection naming
            no axis, ...; one line naming the field.
    """
    if not isinstance(spec, dict):
        raise SweepError(f"{source}: a sweep file is a mapping with base:, grid:, select:, ...")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {', '.join(unknown)}; a sweep file has {', '.join(SWEEP_KEYS)}")
    valid = train_keywords()
    base = dict(spec.get("base") or {})
    check_options(base, _where(source, "base"), valid)
    base.pop("label", None)
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{_where(source, 'grid')}: give at least one axis, e.g. grid: {{lr: [1.0e-3, 1.0e-2]}}")
    for axis, values in grid.items():
        where = _where(source, f"grid.{axis}")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: give a list of values, e.g. {axis}: [a, b]")
        for value in values:
            if isinstance(value, dict):
                check_options(value, where, valid)
            elif axis not in valid:
                raise SweepError(f"{where}: unknown mlic.train keyword {axis}; name a keyword (valid: "
                                 f"{', '.join(k for k in valid if k not in SET_BY_SWEEP)}) or give option dicts")
            elif axis in SET_BY_SWEEP:
                raise SweepError(f"{where}: {axis} is set by mlic sweep for every trial; drop it")
        labels = [axis_label(axis, v) for v in values]
        if len(set(labels)) != len(labels):
            raise SweepError(f"{where}: two values have the same label; give each dict a distinct label:")
    select = spec.get("select") or {}
    if not isinstance(select, dict):
        raise SweepError(f"{_where(source, 'select')}: give {{metric: val_mAP, over: [lr], mean_over: seed}}")
    bad = sorted(set(select) - set(SELECT_KEYS))
    if bad:
        raise SweepError(f"{_where(source, 'select')}: unknown key(s) {', '.join(bad)}; it has "
                         f"{', '.join(SELECT_KEYS)}")
    over = select.get("over") or []
    over = [over] if isinstance(over, str) else list(over)
    for axis in over:
        if axis not in grid:
            raise SweepError(f"{_where(source, 'select.over')}: {axis} is not a grid axis; choose among "
                             f"{', '.join(grid)}")
    mean_over = select.get("mean_over")
    if mean_over is not None and (mean_over not in grid or mean_over in over):
        raise SweepError(f"{_where(source, 'select.mean_over')}: {mean_over} is not a grid axis outside "
                         f"select.over; choose among {', '.join(a for a in grid if a not in over)}")
    choose = select.get("choose", "mean")
    if choose not in CHOOSE or (choose == "each" and mean_over is None):
        raise SweepError(f"{_where(source, 'select.choose')}: {choose!r}; choose mean (the best setting averaged over "
                         "mean_over) or each (the best setting per value of mean_over, which each needs)")
    metric = select.get("metric", "val_mAP")
    report = spec.get("report", "test_mAP")
    for key, value in (("select.metric", metric), ("report", report)):
        if value not in METRICS:
            raise SweepError(f"{_where(source, key)}: {value!r}; choose {' or '.join(METRICS)}")
    resources = spec.get("resources") or {}
    bad = sorted(set(resources) - set(RESOURCE_KEYS)) if isinstance(resources, dict) else ["?"]
    if bad:
        raise SweepError(f"{_where(source, 'resources')}: give {{cpus: 1, gpus: 0}} (unknown: {', '.join(bad)})")
    cpus, gpus = resources.get("cpus", 1), resources.get("gpus", 0)
    if not isinstance(cpus, (int, float)) or not isinstance(gpus, (int, float)) or cpus <= 0 or gpus < 0:
        raise SweepError(f"{_where(source, 'resources')}: cpus > 0 and gpus ≥ 0 per trial, e.g. {{cpus: 4, gpus: 1}}")
    max_concurrent = spec.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise SweepError(f"{_where(source, 'max_concurrent')}: a whole number ≥ 1 (or leave it out: as many as fit)")
    retries = spec.get("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise SweepError(f"{_where(source, 'retries')}: a whole number ≥ 0")
    exclude = spec.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise SweepError(f"{_where(source, 'exclude')}: a list of option dicts, e.g. [{{mode: linear, head: boostlu}}]")
    for entry in exclude:
        check_options(entry, _where(source, "exclude"), valid)
    return Sweep(base, dict(grid), over, mean_over, metric, report, cpus, gpus, max_concurrent, retries, exclude,
                 str(spec.get("description") or ""), choose)


def read_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file; give a YAML file such as recipes/sweeps/spl_multidigits.yaml")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_sweep(spec, str(path))


# ---------------------------------------------------------------------------------------------------------------
# trials


def axis_label(axis: str, value) -> str:
    """How a value of an axis is named in folder names and tables: ``1e-3``, ``ll_r (delta_rel=3)``."""
    if not isinstance(value, dict):
        return _text(value)
    if "label" in value:
        return str(value["label"])
    main = _text(value[axis]) if axis in value else ""
    rest = ", ".join(f"{k}={_text(v)}" for k, v in _flat(value).items() if k != axis)
    return f"{main} ({rest})" if main and rest else main or rest


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flat(options: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out.update(_flat(v, ""))
        elif k != "label":
            out[prefix + k] = v
    return out


def merge(options: dict, more: dict) -> dict:
    """``options`` updated by ``more``; dict options (loss_args, head_args, linear_args) merged key by key."""
    out = dict(options)
    for k, v in more.items():
        if k == "label":
            continue
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def absolute_paths(options: dict, cwd: Path) -> dict:
    """File options made absolute against ``cwd`` (``pretrained: timm`` / ``hf-hub:`` kept)."""
    out = dict(options)
    for key in PATH_OPTIONS:
        value = out.get(key)
        if value is None or (key == "pretrained" and (value == "timm" or str(value).startswith("hf-hub:"))):
            continue
        out[key] = str((cwd / Path(value).expanduser()).resolve())
    return out


def folder_name(axes: dict[str, str]) -> str:
    """A trial's folder name from its axis labels: ``loss=an,lr=0.001,seed=0``."""
    text = ",".join(f"{a}={label}" for a, label in axes.items())
    name = ",".join(f"{a}={re.sub(r'[^A-Za-z0-9.+-]+', '_', label).strip('_')}" for a, label in axes.items())
    if len(name) > 150:
        name = name[:140] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def trials(sweep: Sweep, cwd: Path | None = None) -> list[dict]:
    """Every trial of the grid, in grid order: ``{"name", "axes" (axis -> label), "options"}``."""
    import itertools

    cwd = cwd or Path.cwd()
    out = []
    for combo in itertools.product(*sweep.grid.values()):
        options, axes = dict(sweep.base), {}
        for axis, value in zip(sweep.grid, combo):
            options = merge(options, value if isinstance(value, dict) else {axis: value})
            axes[axis] = axis_label(axis, value)
        if any(all(options.get(k) == v for k, v in entry.items()) for entry in sweep.exclude):
            continue
        out.append({"name": folder_name(axes), "axes": axes, "options": absolute_paths(options, cwd)})
    if not out:
        raise SweepError("exclude: leaves no trial of the grid; drop an entry or add grid values")
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise SweepError("two trials have the same folder name; give the grid's option dicts distinct labels")
    return out


def features_folder(options: dict, out: Path) -> Path | None:
    """The feature cache a linear-probe trial shares: one per backbone, weights, data and transform.

    None (the run's own cache) outside linear modes, and without ``pretrained``: a random backbone's features
    depend on its initialisation.
    """
    if options.get("mode") not in ("linear", "linear-init") or not options.get("pretrained"):
        return None
    key = {k: options.get(k) for k in ("backbone", "pretrained", "data", "digits_size", "img_size", "recipe",
                                       "val_fraction")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return out / "features" / digest


def trial_row(trial: dict, run, run_dir: Path) -> dict:
    """A finished trial's row of results.jsonl; ``test_mAP`` as its own test_metrics.json holds it."""
    test_file = run_dir / "test_metrics.json"
    test = json.loads(test_file.read_text()) if test_file.exists() else {}
    return {"trial": trial["name"], "axes": trial["axes"], "options": trial["options"],
            "val_mAP": run.best_val_map, "test_mAP": test.get("mAP"), "best_epoch": run.best_epoch,
            "val_mAP_per_epoch": [r.get("val_mAP") for r in run.history], "run_dir": str(run_dir),
            "seconds": round(run.seconds, 2), "host": socket.gethostname(), "finished": time.strftime("%FT%T")}


def run_trial(trial: dict, out: str | Path, threads: int | None = None) -> dict:
    """One trial: ``mlic.train`` into ``out/trials/NAME`` with TensorBoard curves; its row (also in trial.json).

    A finished trial (its trial.json there, with the same options) is not run again; a fine-tuning run with a
    ``last.pt`` continues from it (mlic's exact resume); anything else left in the folder is replaced.
    """
    import mlic
    from mlic.io import atomic_write_bytes
    from mlic.outputs import unlock_folder

    out = Path(out)
    run_dir = out / "trials" / trial["name"]
    done = run_dir / "trial.json"
    if done.exists():
        row = json.loads(done.read_text())
        if row.get("options") == trial["options"]:
            return row
    options = dict(trial["options"])
    if threads and "threads" not in options:
        options["threads"] = threads
    resume = options.get("mode", "finetune") == "finetune" and (run_dir / "last.pt").exists()
    overwrite = not resume and run_dir.exists()
    if overwrite:  # the curves of an earlier try would mix with this one's
        for events in run_dir.glob("events.out.tfevents.*"):
            events.unlink()
    log_file = out / "logs" / f"{trial['name']}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as stream:
        def log(*parts, **_):
            stream.write(" ".join(str(p) for p in parts) + "\n")
            stream.flush()

        log(f"--- {time.strftime('%FT%T')} on {socket.gethostname()}: "
            f"{'resume from last.pt' if resume else 'start'}")
        try:
            run = mlic.train(**options, out=run_dir, resume=resume, overwrite=overwrite, log=log,
                             log_to="tensorboard", features_dir=features_folder(options, out), quiet=True)
        finally:
            unlock_folder(run_dir)
    row = trial_row(trial, run, run_dir)
    atomic_write_bytes(done, json.dumps(row, indent=1).encode())
    return row


def ray_trial_dirname(trial) -> str:
    """Ray's folder of a trial (under ``out/ray``): the trial's own name, not its whole config."""
    return f"{trial.config['trial']['name'][:100]}-{trial.trial_id}"


def error_line(error: BaseException) -> str:
    """The one line that says what went wrong: the exception's last non-empty line, with its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def ray_trial(config: dict) -> None:
    """The Ray Tune function trainable: one :func:`run_trial`, its metrics reported to Tune.

    An exception raised by the trial's own code fails the same way every time (a bad setting, a loss that
    diverges): it is written to ``trials/NAME/error.json`` and reported once, and the trial ends there instead of
    being retried. Ray's retries are for trials whose worker or node died.
    """
    from ray import tune

    from mlic.io import atomic_write_bytes

    trial, out = config["trial"], Path(config["out"])
    failed = out / "trials" / trial["name"] / "error.json"
    failed.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        row = run_trial(trial, out, config.get("threads"))
    except Exception as e:  # noqa: BLE001 - any error of the trial's code is its result
        failed.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(failed, json.dumps({"trial": trial["name"], "axes": trial["axes"], "error": error_line(e),
                                               "host": socket.gethostname(),
                                               "finished": time.strftime("%FT%T")}, indent=1).encode())
        row = {"failed": 1, "seconds": round(time.perf_counter() - start, 2)}
    report = getattr(tune, "report", None)
    if report is None:  # Ray before the Tune/Train split
        from ray.train import report
    report({k: row[k] for k in ("val_mAP", "test_mAP", "best_epoch", "seconds", "failed") if row.get(k) is not None})


def failed_trials(out: Path, all_trials: list[dict]) -> dict[str, str]:
    """Trial name -> its error line, for the trials that failed in their own code (and did not finish since)."""
    failed = {}
    for trial in all_trials:
        folder = out / "trials" / trial["name"]
        if (folder / "error.json").exists() and not (folder / "trial.json").exists():
            failed[trial["name"]] = json.loads((folder / "error.json").read_text())["error"]
    return failed


def check_trials(all_trials: list[dict], source: str) -> None:
    """Refuse, before any trial runs, a loss or head a trial names that does not exist, and arguments it does not
    take (``loss_args`` / ``head_args``, a recipe's included), as ``mlic train`` would refuse them one by one."""
    from mlic.config import TrainConfig, read_recipe
    from mlic.registry import check_arguments, get_head, get_loss

    seen = set()
    for trial in all_trials:
        options = trial["options"]
        sections = read_recipe(options["recipe"]) if options.get("recipe") else {}
        train, model = sections.get("train") or {}, sections.get("model") or {}
        loss = str(options.get("loss") or train.get("loss") or TrainConfig.loss).lower().replace("-", "_")
        loss_args = {**(train.get("loss_args") or {}), **(options.get("loss_args") or {})}
        head = options.get("head") or model.get("head")
        head_args = {**(model.get("head_args") or {}), **(options.get("head_args") or {})}
        key = json.dumps([loss, sorted(loss_args), head, sorted(head_args)], default=str)
        if key in seen:
            continue
        seen.add(key)
        where = f"{source}: trial " + ", ".join(f"{a}={v}" for a, v in trial["axes"].items())
        try:
            check_arguments(get_loss(loss), loss_args, f"loss '{loss}'", "loss_args")
            if head:
                check_arguments(get_head(head), head_args, f"head '{head}'", "head_args", skip=2)
        except MlicError as e:
            raise SweepError(f"{where}: {e}") from None


def progress(total: int, finished: int, log=print):
    """A Ray Tune callback printing one line per finished trial: its axes, val/test mAP and time, the counts of
    trials done / running / pending and an estimate of the time left (from this session's pace)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.done, self.failed, self.started = finished, 0, time.perf_counter()
            self.this_session = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            config = trial.config["trial"]
            self.done += 1
            self.this_session += 1
            running = sum(t.status == "RUNNING" and t is not trial for t in trials)
            pending = max(total - self.done - running, 0)
            axes = ", ".join(f"{a}={v}" for a, v in config["axes"].items())
            if result.get("failed"):
                self.failed += 1
                what = "FAILED (see trials/" + config["name"] + "/error.json)"
            else:
                test = result.get("test_mAP")
                what = f"val mAP {result.get('val_mAP', math.nan):.2f}, test mAP " + \
                       (f"{test:.2f}" if test is not None else "—")
            elapsed = time.perf_counter() - self.started
            left = elapsed / self.this_session * (total - self.done)
            log(f"[{self.done}/{total} done{f', {self.failed} failed' if self.failed else ''}, {running} running, "
                f"{pending} pending; about {_duration(left)} left] {axes}: {what}, "
                f"{result.get('seconds', 0):.0f}s")

    return Progress()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------------------------------------------
# running


def require_ray():
    """Ray Tune, or one line saying how to install it."""
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise SweepError(f"mlic sweep runs on Ray Tune, which is not installed: {INSTALL}") from None
    return ray


def prepare_data(all_trials: list[dict], log=print) -> None:
    """Data sets built once, before any trial: each MultiDigits size the grid uses (prepared folders are read)."""
    from mlic.data.digits import build_multidigits
    from mlic.data.splits import parse_digits_size

    for size in dict.fromkeys(t["options"].get("digits_size") for t in all_trials if not t["options"].get("data")):
        spec = parse_digits_size(size)
        log(f"data: MultiDigits (train {spec.train}, val {spec.val}, test {spec.test})")
        build_multidigits(spec=spec)


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two sweep files' mappings, one short item per field or grid axis."""
    def text(value) -> str:
        return json.dumps(value, default=str, separators=(",", ":"))

    out = []
    old_grid, new_grid = old.get("grid") or {}, new.get("grid") or {}
    for axis in dict.fromkeys([*old_grid, *new_grid]):
        if axis not in new_grid:
            out.append(f"grid.{axis} removed")
        elif axis not in old_grid:
            out.append(f"grid.{axis} added")
        else:
            before = [axis_label(axis, v) for v in old_grid[axis]]
            after = [axis_label(axis, v) for v in new_grid[axis]]
            added, removed = [v for v in after if v not in before], [v for v in before if v not in after]
            changed = [axis_label(axis, v) for v in new_grid[axis] if axis_label(axis, v) in before
                       and old_grid[axis][before.index(axis_label(axis, v))] != v]
            out += [f"grid.{axis}: {what} {', '.join(values)}" for what, values in
                    (("added", added), ("removed", removed), ("changed", changed)) if values]
            if not (added or removed or changed) and before != after:
                out.append(f"grid.{axis}: reordered")
    for key in dict.fromkeys([*old, *new]):
        if key not in ("grid", "description") and old.get(key) != new.get(key):
            out.append(f"{key}: {text(old.get(key))} -> {text(new.get(key))}")
    return out


def start(out: Path, file: Path | None, resume: bool, extend: bool = False, log=print) -> Sweep:
    """The sweep of ``out``: ``file`` copied into ``out/sweep.yaml`` (a new sweep), or the one already there.

    A ``file`` that differs from the one ``out`` holds is refused, naming the differences, unless ``extend`` and
    the change only adds trials (every trial of the held sweep is in the new one, with the same options).
    """
    saved = out / "sweep.yaml"
    if file is None:
        if not saved.exists():
            raise SweepError(f"{out}: no sweep.yaml there; start the sweep with: mlic sweep FILE --out {out}")
        if extend:
            raise SweepError("--extend: give the sweep file with the added values: mlic sweep FILE --out "
                             f"{out} --extend")
        return read_sweep(saved)
    sweep = read_sweep(file)
    text = Path(file).read_text()
    if saved.exists() and saved.read_text() != text:
        held = read_sweep(saved)
        changes = "; ".join(differences(yaml.safe_load(saved.read_text()), yaml.safe_load(text))) or "its text"
        old_trials = {t["name"]: t["options"] for t in trials(held)}
        new_trials = {t["name"]: t["options"] for t in trials(sweep)}
        only_adds = all(new_trials.get(name) == options for name, options in old_trials.items())
        if extend and only_adds:
            log(f"extending the sweep in {out}: {changes} ({len(new_trials) - len(old_trials)} new trials)")
        elif extend:
            raise SweepError(f"{file}: --extend only adds trials, but this changes trials {out} holds ({changes}); "
                             "choose another --out")
        elif resume:
            raise SweepError(f"{file}: differs from the sweep {out} holds ({changes}); resume without FILE"
                             + (", or add the new trials with --extend" if only_adds else ", or give another --out"))
        else:
            raise SweepError(f"{out}: holds another sweep ({changes}); continue it with mlic sweep --out {out} "
                             "--resume" + (", add these trials with --extend" if only_adds else "")
                             + ", or choose another --out")
    from mlic.io import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(saved, text.encode())
    return sweep


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns."""

    rows: list[dict]
    """The rows of results.jsonl (the finished trials)."""
    trials: int
    """Trials in the grid."""
    table: str
    """table.md's text."""

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.trials


def run_sweep(out: str | Path, file: str | Path | None = None, address: str | None = None, resume: bool = False,
              extend: bool = False, log=print) -> SweepResult:
    """Run (or continue) the sweep of ``file`` into ``out`` on Ray Tune; write results and the table.

    Args:
        out: the sweep folder.
        file: the sweep file (None: the one ``out`` holds, for ``--resume``).
        address: an existing Ray cluster (``auto`` or ``HOST:PORT``); None starts Ray on this machine (every core),
            unless Ray is already initialised in this process.
        resume: continue the sweep ``out`` holds; finished trials are kept (and never given to Ray again) either
            way, the others run (a killed fine-tuning from its last.pt, a failed one anew).
        extend: take ``file``'s added grid values into the sweep ``out`` holds and run the new trials.
        log: where lines go.

    Returns:
        The rows of results.jsonl, the number of trials and the table.
    """
    out = Path(out).resolve()
    sweep = start(out, Path(file) if file is not None else None, resume, extend, log)
    all_trials = trials(sweep)
    check_trials(all_trials, str(file or out / "sweep.yaml"))
    ray = require_ray()
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard files of Ray's: mlic writes
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the output that verbose=0 quiets
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    pending = [t for t in all_trials if not (out / "trials" / t["name"] / "trial.json").exists()]
    finished = len(all_trials) - len(pending)
    log(f"sweep: {len(all_trials)} trials ({finished} finished already) into {out}")
    if not pending:
        rows = write_results(out, sweep, all_trials)
        return SweepResult(rows, len(all_trials), write_report(out, sweep, rows, {}))
    prepare_data(pending, log)
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("MLIC_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
               if k in os.environ}
        check_address(address)
        try:
            # "local": a Ray of its own on this machine, never a cluster left running (or a stale file of one)
            ray.init(address=address or "local", include_dashboard=False,
                     runtime_env={"env_vars": env} if env else None, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            if address is None:
                raise
            raise SweepError(f"--address {address}: no Ray cluster reachable there ({error_line(e)}); start one "
                             "with ray start --head, or leave --address out to run on this machine") from None
    elif address is not None:
        log("note: Ray is already initialised in this process; --address is not used")
    run_config_cls = getattr(tune, "RunConfig", None) or ray.train.RunConfig
    failure_cls = getattr(tune, "FailureConfig", None) or ray.train.FailureConfig
    trainable = tune.with_resources(ray_trial, {"cpu": sweep.cpus, "gpu": sweep.gpus})
    threads = max(1, int(sweep.cpus))
    # only the unfinished trials go to Ray: a finished one is never run (nor counted) again
    space = {"trial": tune.grid_search(pending), "out": str(out), "threads": threads}
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent,
                                                   trial_dirname_creator=ray_trial_dirname),
                       run_config=run_config_cls(name="ray", storage_path=str(out), verbose=0,
                                                 failure_config=failure_cls(max_failures=sweep.retries),
                                                 callbacks=[JsonLoggerCallback(), CSVLoggerCallback(),
                                                            progress(len(all_trials), finished, log)]))
    grid = tuner.fit()
    rows = write_results(out, sweep, all_trials)
    failed = failed_trials(out, all_trials)
    for name, line in failed.items():
        log(f"failed: {name}: {line} (its lines: {out / 'logs' / (name + '.log')})")
    missing = len(all_trials) - len(rows) - len(failed)
    if grid.errors or missing:
        first = error_line(grid.errors[0]) if grid.errors else "see logs/"
        log(f"{missing} of {len(all_trials)} trials did not finish after {sweep.retries} retries (e.g. {first}); "
            f"their lines are in {out / 'logs'}; continue with: mlic sweep --out {out} --resume")
    return SweepResult(rows, len(all_trials), write_report(out, sweep, rows, failed))


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Refuse, in one line and within ``timeout`` seconds, a ``HOST:PORT`` where nothing listens (``ray.init`` would
    wait minutes); ``auto`` and None are left to Ray."""
    if address is None or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--address {address}: give auto or HOST:PORT (the head's GCS port, 6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise SweepError(f"--address {address}: no Ray cluster reachable there ({e.strerror or e}); start one with "
                         "ray start --head --port PORT, or leave --address out to run on this machine") from None


def write_results(out: Path, sweep: Sweep, all_trials: list[dict] | None = None) -> list[dict]:
    """results.jsonl from the finished trials' trial.json, in grid order."""
    from mlic.io import atomic_write_bytes

    rows = []
    for trial in all_trials if all_trials is not None else trials(sweep):
        done = out / "trials" / trial["name"] / "trial.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
    atomic_write_bytes(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


def digits_backbone(path: str | Path, epochs: int = 15) -> Path:
    """The MultiDigits sweeps' stand-in for ImageNet weights: digitnet trained with full labels on a separate draw
    (``draw_seed=1``: new images composed from the train scans only, so test scans stay unseen); its backbone's
    weights saved at ``path`` (kept when there). ``python -c "import mlic.sweep as s; s.digits_backbone('F')"``."""
    import tempfile

    from safetensors.torch import save_file

    from mlic.engine.checkpoint import load_model

    path = Path(path)
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_model(digits_teacher(Path(tmp) / "run", epochs))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(path))
    return path


def digits_teacher(folder: str | Path, epochs: int = 15) -> Path:
    """The run folder of that same network (digitnet, full labels, MultiDigits draw 1), kept when there: the
    MultiDigits sweeps' stand-in for a CLIP teacher (``teacher: FOLDER``, ``teacher_args: {kind: classifier}``),
    since a random CLIP teaches nothing. ``python -c "import mlic.sweep as s; s.digits_teacher('D')"``."""
    from mlic.config import ModelConfig, TrainConfig
    from mlic.data.digits import DigitsSpec, build_multidigits
    from mlic.data.splits import Splits
    from mlic.engine.job import TrainJob
    from mlic.engine.run import run

    folder = Path(folder)
    if (folder / "model.json").exists():
        return folder
    draw = build_multidigits(spec=DigitsSpec(train=4000, val=500, test=0, draw_seed=1))
    cfg = TrainConfig(epochs=epochs, lr=4e-3, hflip=False)
    run(TrainJob(ModelConfig(num_classes=10), cfg, Splits(draw["train"], draw["val"], None), folder, progress=False))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# the table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _score(value) -> float:
    return -math.inf if value is None or not math.isfinite(value) else float(value)


def select(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """Cole et al.'s rule: per value of the remaining axes, the ``over`` setting with the best mean ``metric``.

    Returns:
        One entry per row of the table, in grid order: the remaining axes' labels, the chosen ``over`` labels,
        ``{metric}_mean``, ``{report}_mean``, ``{report}_std``, ``n`` and ``trials`` (the chosen trials' names).
    """
    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for row in rows:
        key = tuple(row["axes"][a] for a in sweep.rows)
        setting = tuple(row["axes"][a] for a in sweep.over)
        groups.setdefault(key, {}).setdefault(setting, []).append(row)
    table = []
    for key, settings in groups.items():
        if sweep.choose == "each":  # per value of mean_over, its own best setting
            per: dict[str, list[dict]] = {}
            for rows_of_setting in settings.values():
                for r in rows_of_setting:
                    per.setdefault(r["axes"][sweep.mean_over], []).append(r)
            chosen = [max(candidates, key=lambda r: _score(r[sweep.metric])) for candidates in per.values()]
            best = tuple("/".join(dict.fromkeys(r["axes"][a] for r in chosen)) for a in sweep.over)
        else:
            best = max(settings, key=lambda s: np.mean([_score(r[sweep.metric]) for r in settings[s]]))
            chosen = settings[best]
        reported = [r[sweep.report] for r in chosen if r.get(sweep.report) is not None]
        mean, std = mean_std(reported) if reported else (math.nan, math.nan)
        entry = dict(zip(sweep.rows, key))
        entry.update(zip(sweep.over, best))
        entry[f"{sweep.metric}_mean"] = float(np.mean([_score(r[sweep.metric]) for r in chosen]))
        entry.update({f"{sweep.report}_mean": mean, f"{sweep.report}_std": std, "n": len(reported),
                      "trials": ";".join(r["trial"] for r in chosen)})
        table.append(entry)
    return table


def table_csv(sweep: Sweep, table: list[dict]) -> str:
    columns = sweep.rows + sweep.over + [f"{sweep.metric}_mean", f"{sweep.report}_mean", f"{sweep.report}_std", "n",
                                         "trials"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def table_markdown(sweep: Sweep, table: list[dict]) -> str:
    """Methods × modes when ``mode`` is an axis of the rows (mean ± std, the chosen setting), else one line each."""
    report = sweep.report

    def cell(entry: dict) -> str:
        chosen = ", ".join(f"{a}={entry[a]}" for a in sweep.over)
        value = f"{entry[f'{report}_mean']:.2f} ± {entry[f'{report}_std']:.2f}"
        return value + (f" ({chosen})" if chosen else "") + (f" n={entry['n']}" if sweep.mean_over else "")

    others = [a for a in sweep.rows if a != "mode"]
    if "mode" in sweep.rows and others:
        modes = list(dict.fromkeys(e["mode"] for e in table))
        lines = ["| " + " | ".join(others + [f"{m} ({report})" for m in modes]) + " |",
                 "|" + "---|" * (len(others) + len(modes))]
        cells: dict[tuple, dict[str, str]] = {}
        for entry in table:
            cells.setdefault(tuple(entry[a] for a in others), {})[entry["mode"]] = cell(entry)
        for key, by_mode in cells.items():
            lines.append("| " + " | ".join(list(key) + [by_mode.get(m, "—") for m in modes]) + " |")
    else:
        lines = ["| " + " | ".join(sweep.rows + [report]) + " |", "|" + "---|" * (len(sweep.rows) + 1)]
        lines += ["| " + " | ".join([str(e[a]) for a in sweep.rows] + [cell(e)]) + " |" for e in table]
    return "\n".join(lines) + "\n"


def plot_curves(sweep: Sweep, table: list[dict], rows: list[dict], path: Path) -> None:
    """Validation mAP per epoch of each table row's chosen setting (mean over ``mean_over``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlic.engine.report import save_figure

    by_name = {r["trial"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in table:
        curves = [by_name[n]["val_mAP_per_epoch"] for n in entry["trials"].split(";") if n in by_name]
        length = min((len(c) for c in curves), default=0)
        if not length:
            continue
        mean = np.nanmean(np.array([[np.nan if v is None else v for v in c[:length]] for c in curves], float), 0)
        ax.plot(range(1, length + 1), mean, label=", ".join(str(entry[a]) for a in sweep.rows) or "all")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("validation mAP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def write_report(out: str | Path, sweep: Sweep | None = None, rows: list[dict] | None = None,
                 failed: dict[str, str] | None = None) -> str:
    """table.csv, table.md and val_mAP.png from results.jsonl (``mlic sweep --report``); returns table.md.

    ``failed`` (trial name -> error line; read from the trials' error.json when None) is listed under the table.

    Raises:
        SweepError: finished trials, but none reports the selection metric or the reported value.
    """
    from mlic.io import atomic_write_bytes

    out = Path(out)
    sweep = sweep or start(out, None, False)
    if rows is None:
        results = out / "results.jsonl"
        if not results.exists():
            raise SweepError(f"{out}: no results.jsonl yet; run the sweep first: mlic sweep FILE --out {out}")
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if failed is None:
        failed = failed_trials(out, trials(sweep))
    for key, name in ((sweep.metric, "select.metric"), (sweep.report, "report")):
        if rows and all(r.get(key) is None for r in rows):
            raise SweepError(f"{out / 'sweep.yaml'}: {name}: no finished trial reports {key} (e.g. no test split "
                             f"in the data); choose {' or '.join(m for m in METRICS if m != key)}, then mlic sweep "
                             f"--out {out} --report (the {len(rows)} finished trials are kept in results.jsonl)")
    table = select(sweep, rows)
    markdown = table_markdown(sweep, table)
    note = (f"\n{len(rows)} trials; per row the setting of {', '.join(sweep.over) or '(nothing)'} with the best "
            f"{sweep.metric}" + (f" for each {sweep.mean_over}" if sweep.choose == "each" else
                                 f" averaged over {sweep.mean_over}" if sweep.mean_over else "") +
            f"; {sweep.report} mean ± std" + (f" over {sweep.mean_over}" if sweep.mean_over else "") +
            ". Made by `mlic sweep`.\n")
    if failed:
        note += f"\nFailed ({len(failed)}; not in the table, rerun with --resume):\n" + "".join(
            f"- {name}: {line}\n" for name, line in failed.items())
    atomic_write_bytes(out / "table.csv", table_csv(sweep, table).encode())
    atomic_write_bytes(out / "table.md", (markdown + note).encode())
    if rows:
        plot_curves(sweep, table, rows, out / "val_mAP.png")
    return markdown + note
