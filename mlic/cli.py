"""The ``mlic`` command: one typed function per subcommand.

Errors a user can cause end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from mlic.config import IMG_SIZES, TrainConfig
from mlic.errors import MlicError

T = TrainConfig  # the defaults the help texts state


def registered(kind: str) -> str:
    """The names in a registry (mlic.registry), for help texts: the lists are generated, never written twice."""
    from mlic import registry

    lists = {"loss": registry.list_losses, "head": registry.list_heads, "backbone": registry.list_backbones,
             "reader": registry.list_readers}
    return ", ".join(lists[kind]())


def reader_options() -> str:
    """Each data-set kind's reader options with their defaults, for ``mlic prepare --option``'s help."""
    from mlic.data.prepare import describe_options
    from mlic.registry import list_readers

    return "; ".join(f"{kind} {describe_options(kind)}" for kind in list_readers())


app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Multi-label image classification: train, evaluate and predict; full, partial or "
                       "single-positive labels.")


DEBUG = {"on": False}


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of user errors too.")] = False,
) -> None:
    """Multi-label image classification: train, evaluate and predict; full, partial or single-positive labels."""
    DEBUG["on"] = debug


def user_errors(fn):
    """Turn the errors a user can cause (:class:`MlicError`, ``OSError`` on their paths) into one line and
    exit code 2; any other exception is a bug and keeps its traceback. ``--debug`` keeps it for all."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlic.errors import MlicError

        try:
            return fn(*args, **kwargs)
        except (MlicError, OSError) as e:
            if DEBUG["on"]:
                raise
            line = os_error_line(e) if isinstance(e, OSError) else str(e)
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def os_error_line(e: OSError) -> str:
    """One line for a file-system error: the path, what went wrong, what to do."""
    import errno

    path = e.filename or ""
    advice = {errno.ENOSPC: "free some space or write elsewhere", errno.EROFS: "choose a writable location",
              errno.EACCES: "choose a location you may write to, or fix its permissions",
              errno.EPERM: "choose a location you may write to, or fix its permissions",
              errno.ENOENT: "check the path"}.get(e.errno)
    reason = (e.strerror or str(e)).strip().splitlines()[0]
    return (f"{path}: " if path else "") + reason + (f"; {advice}" if advice and advice not in reason else "")


def read_class_names(path: Path) -> list[str]:
    """``--classes FILE``: one class name per line (blank lines ignored)."""
    from mlic.errors import MlicError

    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise MlicError(f"{path}: not a text file; --classes takes a file with one class name per line") from None


def import_user_module(name: str) -> None:
    """``--import``: a module name importable from sys.path (or the current folder), or a ``.py`` file."""
    import importlib
    import importlib.util

    path = Path(name)
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise MlicError(f"--import {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            importlib.import_module(name)
    except ImportError as e:
        raise MlicError(f"--import {name}: cannot import it ({e}); give a module on the Python path or a .py "
                        "file") from None


def parse_kv(items: list[str] | None, option: str) -> dict:
    """KEY=VALUE strings -> dict, values parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise MlicError(f"{option} {item!r}: write KEY=VALUE, e.g. {option} gamma_neg=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


METRIC_KEYS = ("mAP", "mAP_voc", "CP", "CR", "CF1", "OP", "OR", "OF1", "CF1_top3", "OF1_top3")


def format_metrics(metrics: dict, classes: list[str], title: str, width: int = 80) -> str:
    """The metrics table and per-class AP as plain text lines of at most ``width`` columns.

    Columns wrap onto further rows instead of being cut, so the table reads the same in a narrow
    terminal and in a log file.
    """
    lines = [title]
    keys = [k for k in METRIC_KEYS if k in metrics]
    per_row = max(1, width // 10)
    for start in range(0, len(keys), per_row):
        chunk = keys[start:start + per_row]
        lines.append("".join(f"{k:>10}" for k in chunk))
        lines.append("".join(f"{metrics[k]:>10.2f}" for k in chunk))
    if "per_class_ap" in metrics:
        lines.append("AP per class")
        name_width = min(max(len(c) for c in classes), width - 8)
        cell = name_width + 8
        per_line = max(1, (width + 2) // (cell + 2))
        cells = [f"{c[:name_width]:<{name_width}} {ap:7.2f}" for c, ap in zip(classes, metrics["per_class_ap"])]
        rows = -(-len(cells) // per_line)
        for r in range(rows):  # column-major, as a reader scans down a column
            lines.append("  ".join(cells[r + rows * c] for c in range(per_line) if r + rows * c < len(cells)))
    return "\n".join(lines)


def print_metrics(metrics: dict, classes: list[str], title: str) -> None:
    """Print :func:`format_metrics` to standard output."""
    typer.echo(format_metrics(metrics, classes, title))


@app.command()
@user_errors
def train(
    data: Annotated[Path | None, typer.Option(help="Prepared data folder (train/ [val/] [test/] LabelSets, from "
                                                "'mlic prepare'). Default: the embedded MultiDigits.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for the model, logs and report. "
                                                     "Default: runs/<date-time>.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone: any timm model name, or in-house "
                                                      f"{registered('backbone')} (default digitnet).")] = None,
    head: Annotated[str | None, typer.Option(help=f"Head: {registered('head')} (default linear).")] = None,
    head_arg: Annotated[list[str] | None, typer.Option(help="Head setting KEY=VALUE (repeatable), e.g. "
                                                              "hidden_dim=256.")] = None,
    img_size: Annotated[int | None, typer.Option(help=f"Square input size in pixels, {IMG_SIZES[0]} to "
                                                      f"{IMG_SIZES[1]} (default 64).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Backbone weights: a local file (.safetensors or torch), "
                                                        "'timm' (the backbone's default pretrained tag, e.g. "
                                                        "--backbone resnet50.a1_in1k) or 'hf-hub:ORG/NAME[@REV]', "
                                                        "through the Hugging Face cache (HF_HOME; HF_HUB_OFFLINE=1 "
                                                        "honoured).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (model: and train: sections); options given "
                                                        "on the command line override it.")] = None,
    mode: Annotated[str | None, typer.Option(help="finetune (end to end, the default), linear (a linear head on "
                                                  "cached features) or linear-init (linear, then finetune from "
                                                  "it, as Cole et al.).")] = None,
    loss: Annotated[str | None, typer.Option(help=f"Loss: {registered('loss')} (default {T.loss}); 'mlic losses' "
                                                  "describes each.")] = None,
    loss_arg: Annotated[list[str] | None, typer.Option(help="Loss setting KEY=VALUE (repeatable), e.g. "
                                                              "gamma_neg=2.")] = None,
    observe: Annotated[str | None, typer.Option(help="Simulate incomplete train labels: single-positive or "
                                                        "partial:P (keep each label with probability P).")] = None,
    observe_seed: Annotated[int, typer.Option(help="Seed of the simulated observation (Cole et al.: 1200).")] = 1200,
    epochs: Annotated[int | None, typer.Option(help=f"Epochs (default {T.epochs}; the MultiDigits demo 15; "
                                                    "linear mode 25).")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"Batch size per process (default {T.batch_size}; "
                                                        "linear mode 1024).")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Peak learning rate, OneCycle + AdamW (default {T.lr:g}; the "
                                                  "MultiDigits demo 4e-3; linear mode 7e-3).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help=f"AdamW weight decay (default {T.weight_decay:g}).")]
        = None,
    ema: Annotated[float | None, typer.Option(help=f"EMA decay of the weights; 0 disables (default {T.ema:g}).")]
        = None,
    amp: Annotated[str | None, typer.Option(help=f"Mixed precision: auto, bf16, fp16, off (default {T.amp}).")]
        = None,
    augment: Annotated[str | None, typer.Option(help=f"Augmentation: none, flip, light, randaugment (default "
                                                     f"{T.augment}).")] = None,
    hflip: Annotated[bool | None, typer.Option(help="Random horizontal flips (default on; off for MultiDigits, "
                                                    "where mirrored digits are other shapes).")] = None,
    freeze: Annotated[list[str] | None, typer.Option(help="Freeze backbone parameters with this name prefix "
                                                             "(repeatable), e.g. conv1.")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-loading worker processes (default: chosen from the "
                                                     "core count, and printed).")] = None,
    decode_device: Annotated[str | None, typer.Option(help="Where training JPEGs are decoded and augmented: cpu (the "
                                                           "workers, default) or cuda (nvjpeg, batched).")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Seed of initialisation and data order (default {T.seed}).")]
        = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train held out for validation when the data "
                                                     "has no val/ split.")] = 0.2,
    digits_size: Annotated[str | None, typer.Option(help="MultiDigits sizes TRAIN,VAL,TEST (default "
                                                         "4000,1000,2000).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run already in --out (its files only).")] = False,
    init_from: Annotated[Path | None, typer.Option(help="Start fine-tuning from this finished run: its model "
                                                        "weights and loss state (e.g. ROLE's estimated labels).")]
        = None,
    linear_arg: Annotated[list[str] | None, typer.Option(help="Setting of the linear phase (--mode linear or "
                                                               "linear-init) KEY=VALUE, e.g. batch_size=16.")] = None,
    checkpoint_every: Annotated[float | None, typer.Option(help="Minutes between checkpoints inside an epoch, so "
                                                                "--resume continues at the next batch (default: "
                                                                "10 on real data, epoch ends only on MultiDigits).")]
        = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: chosen with --workers from the "
                                                      "core count, and printed).")] = None,
    strict_images: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of skipping "
                                                     "and counting it.")] = False,
    max_bad_images: Annotated[str, typer.Option(help="Unreadable images tolerated per split before the run "
                                                     "stops: a share (1%, 0.01) or a count (25).")] = "1%",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    import_: Annotated[list[str] | None, typer.Option("--import", help="Import this Python module (a name on "
                                                      "sys.path or a .py file) first, so that the losses, heads "
                                                      "and backbones it registers can be named (repeatable).")]
        = None,
    log_to: Annotated[str | None, typer.Option("--log", help="Also write the training curves: tensorboard (event "
                                                            "files in --out; pip install -e '.[tensorboard]').")]
        = None,
    teacher: Annotated[str | None, typer.Option(help="A frozen teacher's weights whose pseudo-labels the loss gets "
                                                     "(vlpl, aevlp; other losses: extra positives): CLIP .pt "
                                                     "(OpenAI / open_clip) or Hugging Face folder; an mlic model "
                                                     "folder with --teacher-arg kind=classifier.")] = None,
    teacher_arg: Annotated[list[str] | None, typer.Option(help="Teacher setting KEY=VALUE (repeatable), e.g. "
                                                              "rule=aevlp, threshold=0.5, prompt='a photo of a {}.', "
                                                              "teacher_input=clip, dtype=float16.")] = None,
    teacher_cache: Annotated[bool, typer.Option(help="One teacher pass before training, pseudo-labels kept and "
                                                     "resumed (default); --no-teacher-cache: every step on the "
                                                     "step's own views (the papers' schedule).")] = True,
) -> None:
    """Train a classifier, keep the best epoch by validation mAP, evaluate it on test, write a report."""
    from mlic.engine import dist
    from mlic.engine.job import make_job
    from mlic.engine.run import run

    for module in import_ or []:
        import_user_module(module)
    job = make_job(data=data, out=out, backbone=backbone, head=head, head_args=parse_kv(head_arg, "--head-arg"),
                   img_size=img_size, pretrained=pretrained, recipe=recipe, mode=mode, loss=loss,
                   loss_args=parse_kv(loss_arg, "--loss-arg"), observe=observe, observe_seed=observe_seed,
                   epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, ema=ema, amp=amp,
                   augment=augment, hflip=hflip, freeze=freeze, workers=workers, decode_device=decode_device,
                   seed=seed, val_fraction=val_fraction, digits_size=digits_size, resume=resume, overwrite=overwrite,
                   init_from=init_from, linear_args=parse_kv(linear_arg, "--linear-arg"),
                   checkpoint_every=checkpoint_every, threads=threads, strict_images=strict_images,
                   max_bad_images=max_bad_images, quiet=quiet, log=typer.echo, log_to=log_to, teacher=teacher,
                   teacher_args=parse_kv(teacher_arg, "--teacher-arg"), teacher_cache=teacher_cache)
    echo, out, mode, splits = job.log, job.out, job.mode, job.splits
    try:
        result = run(job)
    except KeyboardInterrupt:
        echo(f"interrupted; continue with: mlic train --resume --out {out} (and the same options)", err=True)
        raise typer.Exit(130) from None
    if mode != "linear":
        echo(f"trained in {result.seconds:.0f}s; best epoch {result.best_epoch} (val mAP {result.best_val_map:.2f})")
    if result.bad_images:
        echo(f"train: skipped {result.bad_images} unreadable images in all (see the lines above)")
    if result.test_metrics is not None:
        unreadable = result.test_metrics.get("unreadable_images", 0)
        title = f"test ({len(splits.test) - unreadable} images" + (f", {unreadable} unreadable skipped)"
                                                                   if unreadable else ")")
        print_metrics(result.test_metrics, splits.train.classes, title)
    if dist.is_main_process():
        present = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(out).iterdir()
                         if not p.name.startswith("."))
        echo(f"outputs: {out}/ ({', '.join(present)})")


@app.command("eval")
@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Run or model folder written by mlic, an official Query2Label "
                                               "folder (checkpoint.pkl + config_new.json) or ML-Decoder .pth file.")],
    data: Annotated[Path | None, typer.Option(help="Prepared data folder or LabelSet folder. Default: the "
                                                      "MultiDigits test split.")] = None,
    split: Annotated[str, typer.Option(help="Split folder inside --data to evaluate.")] = "test",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics to this JSON file "
                                                                          "(strict JSON: nan as null).")]
        = None,
    strict_images: Annotated[bool, typer.Option(help="Stop at the first unreadable image.")] = False,
    max_bad_images: Annotated[str, typer.Option(help="Unreadable images tolerated before the evaluation stops: "
                                                     "a share (1%, 0.01) or a count (25).")] = "1%",
) -> None:
    """Evaluate a saved model: mAP (sklearn-style and VOC-interpolated), CP/CR/CF1/OP/OR/OF1, per-class AP.

    Partial labels (dense or sparse) are scored over their known entries only: a class with no known positive
    has AP nan (null in --json) and the mAP averages the classes with a known positive (mAP_classes).
    """
    from mlic.api import evaluation, load
    from mlic.engine.predict import model_files
    from mlic.outputs import Output, check_outputs

    if json_out:
        check_outputs([Output("--json", json_out, "metrics-json")], model_files(checkpoint))
    done = evaluation(load(checkpoint), data, split, batch_size, workers, strict_images, max_bad_images)
    metrics, labelset, rows, bad = done.metrics, done.labelset, done.rows, done.bad
    if bad:
        typer.echo(f"skipped {len(bad)} unreadable images, e.g. {bad[0]}")
    title = f"{checkpoint} on {len(rows)} images" + (f" ({len(bad)} unreadable skipped)" if bad else "")
    averaged = (f"mAP over the {metrics['mAP_classes']} of {labelset.num_classes} classes with a known positive "
                "(the others: nan)")
    if labelset.sparse:
        title += f"\nknown entries only ({labelset.targets.nnz:,} labels): {averaged}"
    elif metrics["mAP_classes"] < labelset.num_classes:
        title += f"\n{averaged}"
    print_metrics(metrics, labelset.classes, title)
    if json_out:
        from mlic.engine.report import write_metrics_json

        write_metrics_json(json_out, metrics, labelset.classes)


@app.command()
@user_errors
def predict(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Image files or folders (searched recursively), or one "
                                                             "LabelSet folder.")] = None,
    checkpoint: Annotated[Path, typer.Option(help="Run or model folder written by mlic, an official Query2Label "
                                               "folder, or an .onnx file from 'mlic export onnx'.")] = ...,
    path_list: Annotated[Path | None, typer.Option("--list", help="Text file with one image path per line "
                                                                  "(relative to the file's folder).")] = None,
    engine: Annotated[str | None, typer.Option(help="torch or onnx. Default: onnx for an .onnx checkpoint, "
                                                       "else torch.")] = None,
    threshold: Annotated[float | None, typer.Option(help="One score threshold for every class. Default: the "
                                                            "per-class thresholds tuned on validation.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep at most this many labels per image.")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="Stream one JSON line per image (labels, all scores, error) "
                                                    "into this file.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Stream path,labels,score per class into this CSV.")]
        = None,
    resume: Annotated[bool, typer.Option(help="Append to --jsonl/--csv, skipping the paths they already hold "
                                              "(the same model and label options only).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --jsonl/--csv/--explain files even when they are not "
                                                 "mlic's predictions (never the command's own inputs).")] = False,
    explain: Annotated[Path | None, typer.Option(help="Write per-label attention maps (PNG) into this folder "
                                                         "(Query2Label models, torch engine).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 2,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
) -> None:
    """Label images with scores, batch by batch: printed, or streamed to --jsonl/--csv (resumable)."""
    from mlic.data.labelset import LabelSet
    from mlic.engine.predict import Predictor, list_images, read_path_list, unique_paths
    from mlic.engine.results import AttentionFiles, ResultWriter, model_identity
    from mlic.progress import progress_bar

    if resume and not (jsonl or csv_out):
        raise MlicError("--resume needs --jsonl or --csv: the files to continue")
    if resume and overwrite:
        raise MlicError("--resume and --overwrite contradict each other; choose one")
    predictor = Predictor(checkpoint, engine=engine)
    inputs = inputs or []
    unreadable: list[Path] = []
    if len(inputs) == 1 and (inputs[0] / "labelset.json").is_file() and path_list is None:
        labelset = LabelSet.load(inputs[0])
        paths = [labelset.path(i) for i in range(len(labelset))]
    else:
        paths = list_images(inputs, unreadable) + (read_path_list(path_list) if path_list else [])
    for folder in unreadable:
        typer.echo(f"{shown(folder)}: cannot list this folder (permissions?); its images are not predicted", err=True)
    given = len(paths)
    images = unique_paths(paths)  # {resolved: as given}: each path resolved once
    paths = list(images.values())
    if not paths:
        raise MlicError(f"no images found in {', '.join(map(str, inputs)) or path_list or 'the arguments'}; "
                         "give image files, folders, a LabelSet folder or --list")
    if explain and not predictor.has_attention:
        raise MlicError("--explain needs a Query2Label model on the torch engine")
    protected = [*predictor.files, *paths, *([path_list] if path_list else [])]
    identity = model_identity(predictor.files, predictor.classes, predictor.thresholds.tolist(), threshold, top_k) \
        if (jsonl or csv_out) else ""
    writer = ResultWriter(predictor.classes, jsonl, csv_out, resume, identity, protected, overwrite)
    maps = AttentionFiles(explain, images, protected, overwrite) if explain else None
    todo_keys = [k for k in images if not writer.skip(k)]
    todo = [images[k] for k in todo_keys]
    to_files = bool(jsonl or csv_out)
    if given > len(paths):
        typer.echo(f"{given - len(paths)} paths name an image given already; each image is predicted once", err=True)
    if resume:
        typer.echo(f"resuming: {len(paths) - len(todo)} of {len(paths)} images already written", err=True)
    bar = progress_bar(-(-len(todo) // batch_size), f"predict ({predictor.engine.name})",
                       enabled=to_files and not quiet and sys.stderr.isatty())
    done = bad = 0
    t0 = time.perf_counter()
    try:
        for batch in predictor.stream(todo, batch_size, workers, threshold, top_k):
            keys = todo_keys[done:done + len(batch)]  # the stream keeps the order it was given
            writer.write(batch, keys)
            for r, resolved in zip(batch, keys):
                if r.error:
                    bad += 1
                    typer.echo(f"{shown(r.path)}\terror: {r.error}", err=True)
                elif not to_files:
                    typer.echo(f"{shown(r.path)}\t" + (", ".join(f"{c} {s:.3f}" for c, s in r.labels) if r.labels
                                                        else "(no label above threshold)"))
                if maps and not r.error:
                    from mlic.models.explain import write_attention_png

                    png = maps.path(resolved)
                    write_attention_png(predictor.model, r.path, png, predictor.classes, max_labels=top_k or 12,
                                        thresholds=predictor.thresholds if threshold is None else threshold)
                    typer.echo(f"attention maps: {shown(png)}")
            done += len(batch)
            bar.advance(f"{done / (time.perf_counter() - t0):.0f} images/s")
    finally:
        bar.close()
        writer.close()
    if not quiet and to_files:
        seconds = time.perf_counter() - t0
        skipped = f", {len(unreadable)} folders not listable" if unreadable else ""
        typer.echo(f"{done} images in {seconds:.1f}s ({done / max(seconds, 1e-9):.1f} images/s), {bad} unreadable"
                   f"{skipped}; wrote {', '.join(str(p) for p in (jsonl, csv_out) if p)}", err=True)
    if todo and bad == len(todo):
        sys.exit(2)


def shown(path) -> str:
    """A path as one printable line: a newline or a byte that is not UTF-8 appears escaped, never raw."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


export_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Export a model for other runtimes.")
app.add_typer(export_app, name="export")


@export_app.command("onnx")
@user_errors
def export_onnx_command(
    checkpoint: Annotated[Path, typer.Option(help="Run or model folder written by mlic, or an official Query2Label "
                                               "folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.")],
    int8: Annotated[bool, typer.Option(help="Also write <output stem>.int8.onnx, quantized by onnxruntime "
                                            "(dynamic, int8 weights).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the output even when it is not an ONNX file mlic "
                                                 "wrote (never the checkpoint's own files).")] = False,
) -> None:
    """Export to ONNX (uint8 images in, probabilities out, normalisation inside) and check it against PyTorch."""
    from mlic.engine.checkpoint import load_model
    from mlic.engine.predict import model_files
    from mlic.export import PARITY_TOLERANCE, export_onnx, int8_output
    from mlic.outputs import Output, check_outputs

    if output.suffix != ".onnx":
        raise MlicError(f"-o {output}: the ONNX file's name must end in .onnx")
    outputs = [Output("-o", output, "onnx")] + ([Output("--int8", int8_output(output), "onnx")] if int8 else [])
    check_outputs(outputs, model_files(checkpoint), overwrite=overwrite)
    model, meta = load_model(checkpoint, "cpu")
    result = export_onnx(model, meta, output, int8=int8)
    size = model.config.img_size
    typer.echo(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB): input uint8 (batch, 3, {size}, "
               f"{size}), output probabilities (batch, {len(meta['classes'])})")
    typer.echo(f"parity: max |PyTorch - onnxruntime| = {result.max_diff:.2e} (limit {PARITY_TOLERANCE:g})")
    if result.int8_path:
        typer.echo(f"wrote {result.int8_path} ({result.int8_path.stat().st_size / 1e6:.1f} MB): int8 dynamic "
                   f"quantization, max |PyTorch - int8| = {result.int8_max_diff:.2e} (not bounded)")


@app.command()
@user_errors
def serve(
    checkpoint: Annotated[Path, typer.Option(help="Run or model folder written by mlic, an official Query2Label "
                                               "folder, or an .onnx file from 'mlic export onnx'.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the service to the network (set "
                                           "--api-key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one (printed).")] = 8000,
    engine: Annotated[str | None, typer.Option(help="torch or onnx (default: from the checkpoint's file type).")]
        = None,
    max_batch: Annotated[int, typer.Option(help="Most images per forward pass; 1 turns batching off.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits to share a forward pass.")] = 5.0,
    max_files: Annotated[int, typer.Option(help="Most images per request.")] = 16,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MB.")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image in pixels (width x height); one decode takes up to "
                                                 "17 bytes a pixel.")] = 25_000_000,
    decode_workers: Annotated[int, typer.Option(help="Images decoded at once; the others wait.")] = 2,
    max_inflight_mb: Annotated[float, typer.Option(help="Most MB of request bodies held at once (503 above).")]
        = 128.0,
    max_connections: Annotated[int | None, typer.Option(help="Most open connections; at the cap the longest-idle "
                                                             "one is closed (default 1000, or fewer if the "
                                                             "open-file limit is lower).")] = None,
    timeout_header: Annotated[float, typer.Option(help="Seconds a connection has to send a request head.")] = 10.0,
    timeout_keep_alive: Annotated[float, typer.Option(help="Seconds an idle connection stays open after a "
                                                           "response.")] = 5.0,
    timeout_body: Annotated[float, typer.Option(help="Seconds a request body has to arrive in full.")] = 120.0,
    allow_host: Annotated[list[str] | None, typer.Option(help="Without --api-key, also accept this name in the "
                                                              "Host header (repeatable); IP addresses, localhost "
                                                              "and --host always pass.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="MLIC_API_KEY", help="Require 'Authorization: Bearer KEY' "
                                                                            "on /v1/ routes.")] = None,
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /v1/model, GET /healthz, and a web page at /."""
    import ipaddress

    from mlic.engine.predict import Predictor
    from mlic.serve.app import FILES_BESIDES_CONNECTIONS, ServeConfig, bind, create_app, raise_open_file_limit, run

    if not 0 <= port <= 65535:
        raise MlicError(f"--port {port}: give a TCP port from 1 to 65535 (or 0 for any free one)")
    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb,
                         max_pixels=max_pixels, max_files=max_files, decode_workers=decode_workers,
                         max_inflight_mb=max_inflight_mb,
                         max_connections=1000 if max_connections is None else max_connections,
                         timeout_header=timeout_header, timeout_keep_alive=timeout_keep_alive,
                         timeout_body=timeout_body, api_key=api_key or None, host=host,
                         allow_hosts=list(allow_host or []))
    config.check()
    files = raise_open_file_limit()
    room = files - FILES_BESIDES_CONNECTIONS - int(max_inflight_mb)  # an upload over 1 MB is spooled to a file
    if config.max_connections > room:
        if max_connections is not None:
            raise MlicError(f"--max-connections {max_connections}: this process may open {files} files (ulimit -n) "
                            f"and needs about {files - room} beside connections; give at most {max(room, 1)} or "
                            "raise ulimit -n")
        if room < 16:
            raise MlicError(f"this process may open only {files} files (ulimit -n); raise it to 2048 or more")
        config.max_connections = room
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not config.api_key:
        typer.echo(f"warning: --host {host} without --api-key: anyone who can reach this machine can use the "
                   "service; set --api-key KEY (or MLIC_API_KEY)", err=True)
    predictor = Predictor(checkpoint, engine=engine)
    app_ = create_app(predictor, config)
    sock = bind(host.strip("[]"), port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    typer.echo(f"serving {checkpoint} ({predictor.engine.name}, {len(predictor.classes)} classes) on "
               f"http://{shown}:{bound}/ {'with' if api_key else 'without'} an API key; requests can make it hold "
               f"up to {config.worst_case_mb():.0f} MB above its idle size, {config.max_connections} connections",
               err=True)
    run(app_, config, sock)


@app.command()
@user_errors
def prepare(
    kind: Annotated[str, typer.Argument(help=f"Data set kind: {registered('reader')} (cole: Cole et al.'s "
                                              "formatted_*.npy files); or shards: pack a prepared folder (--data) "
                                              "into WebDataset shards.")],
    out: Annotated[Path, typer.Option(help="Folder receiving one LabelSet (or, for shards, shard) folder per split.")],
    root: Annotated[Path | None, typer.Option(help="The data set folder (for table: the CSV/TSV/JSON file).")] = None,
    data: Annotated[Path | None, typer.Option(help="shards: the prepared folder (train/ val/ test/) to pack.")] = None,
    shard_size: Annotated[str | None, typer.Option(help="shards: the most bytes per shard: 1GB (default), 500MB, "
                                                        "256MiB or a number of bytes.")] = None,
    observe: Annotated[str | None, typer.Option(help="Also store simulated observed train labels: single-positive "
                                                     "or partial:P.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the observation draw and the validation hold-out.")] = 1200,
    val_fraction: Annotated[float, typer.Option(help="Hold this share of train out as val/ (Cole et al.: 0.2); "
                                                     "the official held-out split becomes test/.")] = 0.0,
    option: Annotated[list[str] | None, typer.Option(help="Reader option KEY=VALUE (repeatable); each kind's "
                                                          f"(default or choices): {reader_options()}.")] = None,
) -> None:
    """Read a data set on disk into mlic's LabelSet folders (train/ val/ test/), ready for 'mlic train --data'."""
    from mlic.data.labelset import LabelSet
    from mlic.data.prepare import prepare as run_prepare

    if kind == "shards":
        from mlic.data.shards import prepare_shards

        if data is None:
            raise MlicError("mlic prepare shards needs --data PREPARED (a folder written by 'mlic prepare')")
        if root is not None or observe or val_fraction or option:
            raise MlicError("mlic prepare shards packs --data as prepared; --root, --observe, --val-fraction and "
                             "--option belong to preparing it (mlic prepare KIND)")
        for split, index in prepare_shards(data, out, shard_size or "1GB", progress=sys.stderr.isatty(),
                                           log=lambda line: typer.echo(line, err=True)).items():
            unread = f"  ({len(index.skipped)} unreadable, not packed)" if index.skipped else ""
            typer.echo(f"{split:5s} {index.num_samples:7d} images  {len(index.shards)} shards{unread} -> {out / split}")
        return
    if data is not None or shard_size is not None:
        raise MlicError(f"--data and --shard-size belong to 'mlic prepare shards'; mlic prepare {kind} reads --root")
    if root is None:
        raise MlicError(f"mlic prepare {kind} needs --root (the data set folder)")
    written = run_prepare(kind, root, out, observe=observe, seed=seed, val_fraction=val_fraction,
                          **parse_kv(option, "--option"))
    for split, folder in written.items():
        ls = LabelSet.load(folder)
        known = (ls.targets != -1).mean() * 100
        typer.echo(f"{split:5s} {len(ls):7d} images  {ls.num_classes} classes  "
                   f"{(ls.targets == 1).sum(1).mean():.2f} positives/image  {known:.1f}% labels known"
                   f"{'  + observed labels' if ls.observed is not None else ''}  -> {folder}")


@app.command("pseudo-label")
@user_errors
def pseudo_label(
    data: Annotated[Path, typer.Option(help="Prepared data folder (train/ val/ test/) or one LabelSet folder; "
                                            "class names come from it.")],
    teacher: Annotated[Path, typer.Option(help="Teacher weights: CLIP .pt (OpenAI release or open_clip) or a "
                                               "Hugging Face CLIP folder; an mlic model folder with "
                                               "--teacher-arg kind=classifier.")],
    out: Annotated[Path, typer.Option(help="Folder to write: the LabelSets with teacher_sims.npy, "
                                           "pseudo_labels.npy and pseudo_labels.json beside each.")],
    rule: Annotated[str, typer.Option(help="Pseudo-label rule: aevlp (global view + tiles) or vlpl.")] = "aevlp",
    prompt: Annotated[str | None, typer.Option(help="Prompt template for the class names (default "
                                                    "'a photo of a {}.').")] = None,
    teacher_arg: Annotated[list[str] | None, typer.Option(help="Teacher or rule setting KEY=VALUE (repeatable), "
                                                              "e.g. threshold=0.5, top_k=3, teacher_input=clip, "
                                                              "grid_size=4, dtype=float16.")] = None,
    img_size: Annotated[int, typer.Option(help="The student's side the vlpl view is resized from.")] = 448,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 2,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Score every image of a data set with a frozen teacher and write its pseudo-labels beside the labels;
    then mlic train --data OUT --loss aevlp (or any loss: the pseudo-labels become extra positives)."""
    from mlic.data.splits import load_prepared
    from mlic.engine.teaching import pseudo_label_data

    report = pseudo_label_data(data, teacher, out, rule=rule, prompt=prompt,
                               teacher_args=parse_kv(teacher_arg, "--teacher-arg"), img_size=img_size, device=device,
                               workers=workers, progress=not quiet, say=typer.echo)
    classes = next(iter(load_prepared(out).values())).classes
    for split, quality in report.items():
        positives = quality["positives"]
        typer.echo(f"{split}: {int(positives.sum())} pseudo-positives over {len(classes)} classes")
        clean = quality["precision"] is not None
        typer.echo(f"  {'class':24s} {'pseudo-pos':>10s}" + (f" {'precision':>9s} {'recall':>7s}" if clean else ""))
        for k, name in enumerate(classes):
            line = f"  {name[:24]:24s} {int(positives[k]):10d}"
            if clean:
                p, r = quality["precision"][k], quality["recall"][k]
                line += f" {'-' if p != p else f'{100 * p:.1f}':>9s} {'-' if r != r else f'{100 * r:.1f}':>7s}"
            typer.echo(line)
    typer.echo(f"wrote {out}/; train with: mlic train --data {out} --loss {rule}")


@app.command("losses")
def list_losses() -> None:
    """List every loss: its paper, the labels it is meant for, and its settings with their defaults."""
    import inspect

    from mlic.losses import LOSSES

    filled = {"num_images", "num_classes", "observed", "num_epochs", "seed"}  # taken from the data by mlic
    for name in sorted(LOSSES):
        cls = LOSSES[name]
        params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:] if p.name not in filled]
        settings = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                             for p in params)
        typer.echo(f"{name:8s} {cls.labels} labels; {cls.paper}")
        typer.echo(f"{'':8s} --loss-arg: {settings or '(none)'}")
        if getattr(cls, "teacher", None):
            typer.echo(f"{'':8s} teacher: {cls.teacher} (--teacher, or --data from mlic pseudo-label)")


convert_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Convert foreign checkpoints.")
app.add_typer(convert_app, name="convert")


@convert_app.command("q2l")
@user_errors
def convert_q2l(
    folder: Annotated[Path, typer.Argument(help="Official release folder: checkpoint.pkl + config_new.json.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="mlic model folder to write.")],
    classes: Annotated[Path | None, typer.Option(help="Text file with one class name per line (default: COCO's "
                                                      "80 categories when num_class is 80).")] = None,
) -> None:
    """Convert an authors' Query2Label checkpoint into an mlic model folder (safetensors), strictly checked."""
    from mlic.engine.convert import convert_query2label

    names = read_class_names(classes) if classes else None
    out = convert_query2label(folder, output, names)
    typer.echo(f"wrote {out}/model.safetensors and model.json; evaluate with: mlic eval --checkpoint {out} --data ...")


@convert_app.command("ml-decoder")
@user_errors
def convert_ml_decoder(
    file: Annotated[Path, typer.Argument(help="The authors' released .pth (TResNet-M/L/XL + ML-Decoder).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="mlic model folder to write.")],
    classes: Annotated[Path | None, typer.Option(help="Text file with one class name per line (default: the "
                                                      "file's idx_to_class, else COCO's 80 categories).")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size (default: the release's, e.g. 448 for "
                                                      "TResNet-L COCO).")] = None,
) -> None:
    """Convert an authors' ML-Decoder checkpoint into an mlic model folder (safetensors), strictly checked."""
    from mlic.engine.convert import convert_ml_decoder as run_convert

    names = read_class_names(classes) if classes else None
    out = run_convert(file, output, names, img_size)
    typer.echo(f"wrote {out}/model.safetensors and model.json; evaluate with: mlic eval --checkpoint {out} --data ...")


@app.command()
@user_errors
def sweep(
    file: Annotated[Path | None, typer.Argument(help="Sweep file (base:, grid:, select:, report:, resources:), e.g. "
                                                     "recipes/sweeps/spl_multidigits.yaml; omit it with --resume "
                                                     "or --report.")] = None,
    out: Annotated[Path, typer.Option(help="Sweep folder: a run folder per trial, results.jsonl, table.md, "
                                           "table.csv, val_mAP.png.")] = ...,
    address: Annotated[str | None, typer.Option(help="An existing Ray cluster: auto or HOST:PORT. Default: Ray on "
                                                     "this machine, every core.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the sweep in --out: finished trials are kept, the rest "
                                              "run (a killed trial from its last.pt).")] = False,
    extend: Annotated[bool, typer.Option(help="Add FILE's new grid values to the sweep in --out and run the new "
                                              "trials (the trials there must keep their options).")] = False,
    report: Annotated[bool, typer.Option(help="Only write the table again from --out's results.jsonl.")] = False,
) -> None:
    """Run a protocol grid on Ray Tune (a trial is one mlic train) and print the selected table.

    One line per finished trial (its axes, val/test mAP, seconds) with the counts done / running / pending and the
    time left; a trial that fails in its own code is reported once and listed under the table.
    """
    from mlic import sweep as sweeps

    if report:
        typer.echo(sweeps.write_report(out), nl=False)
        return
    if file is None and not resume:
        raise MlicError("give a sweep file (mlic sweep FILE --out DIR), or --resume / --report for --out's sweep")
    done = sweeps.run_sweep(out, file, address=address, resume=resume, extend=extend, log=typer.echo)
    typer.echo(done.table, nl=False)
    typer.echo(f"outputs: {out}/ (results.jsonl, table.md, table.csv, val_mAP.png, trials/); curves: "
               f"tensorboard --logdir {out}")
    if not done.complete:  # the table is printed, but a script must see that trials are missing
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``mlic`` console script."""
    app()


if __name__ == "__main__":
    main()
