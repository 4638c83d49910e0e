"""The ``mlic`` command: one typed function per subcommand.

Errors a user can cause end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Multi-label image classification: train, evaluate and predict; full, partial or "
                       "single-positive labels.")


def user_errors(fn):
    """Turn the errors a user can cause into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlic.data.images import ImageError
        from mlic.data.labelset import LabelSetError
        from mlic.engine.checkpoint import CheckpointError
        from mlic.engine.train import TrainingError
        from mlic.models.backbones import WeightsError

        try:
            return fn(*args, **kwargs)
        except (LabelSetError, ImageError, CheckpointError, WeightsError, TrainingError, ValueError,
                FileNotFoundError, NotADirectoryError, PermissionError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; resume with --resume --out <run dir>", err=True)
            raise typer.Exit(130) from None

    return wrapper


def parse_kv(items: list[str] | None, option: str) -> dict:
    """KEY=VALUE strings -> dict, values parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{option} {item!r}: write KEY=VALUE, e.g. {option} gamma_neg=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_data(data: Path | None, observe: str | None, observe_seed: int, val_fraction: float,
                 digits_size: str | None, echo=typer.echo):
    """The (train, val, test) LabelSets a run uses.

    ``data`` None builds MultiDigits. A prepared folder holds LabelSet folders train/ [val/] [test/]:
    without test/, val/ serves as the test set (as COCO's val2014 does in the papers) and validation is
    ``val_fraction`` of train held out with RandomState(1200) (Cole et al.'s protocol).
    """
    import numpy as np

    from mlic.data.labelset import LabelSet, LabelSetError
    from mlic.data.observe import observe as apply_observation

    if data is None:
        from mlic.data.digits import DigitsSpec, build_multidigits

        spec = DigitsSpec()
        if digits_size:
            try:
                n_train, n_val, n_test = (int(v) for v in digits_size.split(","))
            except ValueError:
                raise ValueError(f"--digits-size {digits_size!r}: write TRAIN,VAL,TEST, e.g. 4000,1000,2000") from None
            spec = DigitsSpec(train=n_train, val=n_val, test=n_test)
        echo(f"data: MultiDigits (train {spec.train}, val {spec.val}, test {spec.test}; built once into the cache)")
        splits = build_multidigits(spec=spec)
        train_set, val_set, test_set = splits["train"], splits["val"], splits["test"]
    else:
        if not data.is_dir():
            raise LabelSetError(f"{data}: no such folder; make one with 'mlic prepare' "
                                "(or omit --data for MultiDigits)")
        if (data / "labelset.json").exists():
            found = {"train": LabelSet.load(data)}
        else:
            found = {s: LabelSet.load(data / s) for s in ("train", "val", "test")
                     if (data / s / "labelset.json").exists()}
        if "train" not in found:
            raise LabelSetError(f"{data}: no train/ LabelSet inside; prepare the data with 'mlic prepare'")
        train_set = found["train"]
        test_set = found.get("test")
        val_set = found.get("val")
        if test_set is None and val_set is not None:
            test_set, val_set = val_set, None
        for other in (val_set, test_set):
            if other is not None and other.classes != train_set.classes:
                raise LabelSetError(f"{data}: the splits have different classes; prepare them together")
    if observe:  # drawn on the whole training split before any hold-out, as Cole et al. do
        observed = apply_observation(np.asarray(train_set.targets), observe, observe_seed)
        train_set = train_set.with_observed(observed)
        echo(f"labels: {observe} observation of train (seed {observe_seed}): "
             f"{(observed == 1).sum(1).mean():.2f} positives and {(observed == 0).sum(1).mean():.2f} negatives "
             "known per image")
    elif train_set.observed is not None:
        echo("labels: using the observed labels stored with the data")
    if val_set is None:
        train_set, val_set = train_set.hold_out(val_fraction, 1200)
        echo(f"data: validation = {len(val_set)} images held out of train (RandomState(1200), as Cole et al.)")
    return train_set, val_set, test_set


def print_metrics(metrics: dict, classes: list[str], title: str) -> None:
    """The metrics table and per-class AP, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    keys = ["mAP", "mAP_voc", "CP", "CR", "CF1", "OP", "OR", "OF1", "CF1_top3", "OF1_top3"]
    table = Table(title=title)
    for k in keys:
        if k in metrics:
            table.add_column(k, justify="right")
    table.add_row(*(f"{metrics[k]:.2f}" for k in keys if k in metrics))
    console.print(table)
    if "per_class_ap" in metrics:
        per = Table(title="AP per class")
        per.add_column("class")
        per.add_column("AP", justify="right")
        per.add_column("class")
        per.add_column("AP", justify="right")
        pairs = list(zip(classes, metrics["per_class_ap"]))
        half = (len(pairs) + 1) // 2
        for left, right in zip(pairs[:half], pairs[half:] + [("", None)]):
            per.add_row(left[0], f"{left[1]:.2f}", right[0], "" if right[1] is None else f"{right[1]:.2f}")
        console.print(per)


@app.command()
@user_errors
def train(
    data: Annotated[Path | None, typer.Option(help="Prepared data folder (train/ [val/] [test/] LabelSets, from "
                                                "'mlic prepare'). Default: the embedded MultiDigits.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for the model, logs and report. "
                                                     "Default: runs/<date-time>.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone: any timm model name, or in-house digitnet "
                                                         "(default) / cvt_w24.")] = None,
    head: Annotated[str | None, typer.Option(help="Head: linear (default) or query2label.")] = None,
    head_arg: Annotated[list[str] | None, typer.Option(help="Head setting KEY=VALUE (repeatable), e.g. "
                                                              "hidden_dim=256.")] = None,
    img_size: Annotated[int | None, typer.Option(help="Square input size in pixels (default 64).")] = None,
    pretrained: Annotated[Path | None, typer.Option(help="Local backbone weight file (.safetensors or torch); "
                                                            "nothing is downloaded.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (model: and train: sections); options given "
                                                        "on the command line override it.")] = None,
    mode: Annotated[str, typer.Option(help="finetune (end to end) or linear (probe on cached features).")]
        = "finetune",
    loss: Annotated[str | None, typer.Option(help="Loss: bce, bce_ls, focal, asl; partial labels: an, an_ls, "
                                                     "wan, epr, role.")] = None,
    loss_arg: Annotated[list[str] | None, typer.Option(help="Loss setting KEY=VALUE (repeatable), e.g. "
                                                              "gamma_neg=2.")] = None,
    observe: Annotated[str | None, typer.Option(help="Simulate incomplete train labels: single-positive or "
                                                        "partial:P (keep each label with probability P).")] = None,
    observe_seed: Annotated[int, typer.Option(help="Seed of the simulated observation (Cole et al.: 1200).")] = 1200,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (per process).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (OneCycle, AdamW).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    ema: Annotated[float | None, typer.Option(help="EMA decay of the weights; 0 disables.")] = None,
    amp: Annotated[str | None, typer.Option(help="Mixed precision: auto, bf16, fp16, off.")] = None,
    augment: Annotated[str | None, typer.Option(help="Augmentation: none, light, randaugment.")] = None,
    hflip: Annotated[bool | None, typer.Option(help="Random horizontal flips (off by default for "
                                                       "MultiDigits, where mirrored digits are other shapes).")] = None,
    freeze: Annotated[list[str] | None, typer.Option(help="Freeze backbone parameters with this name prefix "
                                                             "(repeatable), e.g. conv1.")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-loading worker processes.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and data order.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train held out for validation when the data "
                                                     "has no val/ split.")] = 0.2,
    digits_size: Annotated[str | None, typer.Option(help="MultiDigits sizes TRAIN,VAL,TEST.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    strict_images: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of skipping "
                                                     "and counting it.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Train a classifier, keep the best epoch by validation mAP, evaluate it on test, write a report."""
    from mlic.config import ModelConfig, TrainConfig, load_recipe
    from mlic.engine.report import write_report
    from mlic.engine.train import train as run_training

    if resume and out is None:
        raise ValueError("--resume needs --out: the run folder to continue")
    import os

    echo = typer.echo if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)  # one voice under torchrun
    model_args, train_args = load_recipe(recipe) if recipe else ({}, {})
    train_set, val_set, test_set = resolve_data(data, observe, observe_seed, val_fraction, digits_size, echo)
    is_digits = data is None
    model_args.update({k: v for k, v in {"backbone": backbone, "head": head, "img_size": img_size}.items()
                       if v is not None})
    model_args.setdefault("head_args", {}).update(parse_kv(head_arg, "--head-arg"))
    model_args["num_classes"] = train_set.num_classes
    cli_train = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "ema": ema,
                 "amp": amp, "augment": augment, "hflip": hflip, "freeze": freeze, "workers": workers,
                 "seed": seed, "loss": loss}
    train_args.update({k: v for k, v in cli_train.items() if v is not None})
    train_args.setdefault("loss_args", {}).update(parse_kv(loss_arg, "--loss-arg"))
    if is_digits and mode == "finetune":  # tuned for the 5-minute demo on 2 cores
        train_args.setdefault("hflip", False)
        train_args.setdefault("epochs", 15)
        train_args.setdefault("lr", 4e-3)
    model_cfg = ModelConfig.from_dict(model_args)
    cfg = TrainConfig.from_dict(train_args)
    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    echo(f"model: {model_cfg.backbone} + {model_cfg.head} head, {model_cfg.num_classes} classes, "
         f"{model_cfg.img_size}px; loss {cfg.loss}; mode {mode}; run folder {out}")
    if mode == "linear":
        from mlic.engine.linear import LinearProbeConfig
        from mlic.engine.probe import run_linear_probe

        chosen = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}.items()
                  if v is not None}  # otherwise the probe's own defaults (25 epochs, batch 1024, lr 7e-3)
        if batch_size is None and len(train_set) < 32 * LinearProbeConfig.batch_size:
            chosen["batch_size"] = max(16, len(train_set) // 32)  # keep ≥ 32 steps per epoch on small data
        probe = LinearProbeConfig(loss=cfg.loss, loss_args=cfg.loss_args, estimator_lr_mult=cfg.estimator_lr_mult,
                                  **chosen)
        result = run_linear_probe(model_cfg, probe, train_set, val_set, test_set, out, pretrained, cfg.workers,
                                  quiet=quiet, log=echo)
    elif mode == "finetune":
        t0 = time.perf_counter()
        result = run_training(model_cfg, cfg, train_set, val_set, out, test_set=test_set, resume=resume,
                              pretrained=str(pretrained) if pretrained else None, strict_images=strict_images,
                              progress=not quiet)
        echo(f"trained in {time.perf_counter() - t0:.0f}s; best epoch {result.best_epoch} "
                   f"(val mAP {result.best_val_map:.2f})")
        if result.bad_images:
            echo(f"skipped {result.bad_images} unreadable images in all (see the log lines above)")
    else:
        raise ValueError(f"--mode {mode!r}: choose finetune or linear")
    if result.test_metrics is not None:
        import numpy as np

        scores_path = Path(out) / "test_scores.npy"
        scores = np.load(scores_path) if scores_path.exists() else None
        print_metrics(result.test_metrics, train_set.classes, f"test ({len(test_set)} images)")
        report = write_report(Path(out), f"mlic run {Path(out).name}", result.test_metrics, train_set.classes,
                              result.history, scores, test_set.targets,
                              notes=[f"model: {model_cfg.backbone} + {model_cfg.head}; loss {cfg.loss}; "
                                     f"best epoch {result.best_epoch}"])
        metrics_json = {k: v for k, v in result.test_metrics.items() if k != "per_class_ap"}
        metrics_json["per_class_ap"] = dict(zip(train_set.classes, map(float, result.test_metrics["per_class_ap"])))
        (Path(out) / "test_metrics.json").write_text(json.dumps(metrics_json, indent=1))
        echo(f"outputs: {out}/ (model.safetensors, model.json, metrics.jsonl, test_metrics.json, {report.name})")


@app.command("eval")
@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Run or model folder written by mlic, or an official Query2Label "
                                               "folder (checkpoint.pkl + config_new.json).")],
    data: Annotated[Path | None, typer.Option(help="Prepared data folder or LabelSet folder. Default: the "
                                                      "MultiDigits test split.")] = None,
    split: Annotated[str, typer.Option(help="Split folder inside --data to evaluate.")] = "test",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics to this JSON file.")]
        = None,
    strict_images: Annotated[bool, typer.Option(help="Stop at the first unreadable image.")] = False,
) -> None:
    """Evaluate a saved model: mAP (sklearn-style and VOC-interpolated), CP/CR/CF1/OP/OR/OF1, per-class AP."""
    from mlic.data.labelset import LabelSet, LabelSetError
    from mlic.engine.checkpoint import load_model
    from mlic.engine.evaluate import evaluate_scores, score_labelset

    model, meta = load_model(checkpoint)
    if data is None:
        from mlic.data.digits import build_multidigits

        labelset = build_multidigits()["test"]
    elif (data / "labelset.json").exists():
        labelset = LabelSet.load(data)
    else:
        if not (data / split / "labelset.json").exists():
            fallback = "val" if split == "test" and (data / "val" / "labelset.json").exists() else None
            if fallback is None:
                raise LabelSetError(f"{data / split}: no LabelSet there; pass --split or a prepared folder")
            split = fallback
        labelset = LabelSet.load(data / split)
    if labelset.classes != meta["classes"]:
        raise LabelSetError(f"{checkpoint}: the model's {len(meta['classes'])} classes do not match the "
                            f"{labelset.num_classes} classes of {data}; evaluate on data with the same classes")
    cfg = model.config
    scores, _, bad = score_labelset(model, labelset, cfg.img_size, cfg.mean, cfg.std, next(model.parameters()).device,
                                    batch_size, workers, strict=strict_images)
    if bad:
        typer.echo(f"skipped {len(bad)} unreadable images, e.g. {bad[0]}")
    metrics = evaluate_scores(scores, labelset.targets)
    print_metrics(metrics, labelset.classes, f"{checkpoint} on {len(labelset) - len(bad)} images")
    if json_out:
        from mlic.data.labelset import atomic_write_bytes

        payload = {k: v for k, v in metrics.items() if k != "per_class_ap"}
        payload["per_class_ap"] = dict(zip(labelset.classes, map(float, metrics["per_class_ap"])))
        atomic_write_bytes(json_out, json.dumps(payload, indent=1).encode())


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
    resume: Annotated[bool, typer.Option(help="Append to --jsonl/--csv, skipping the paths they already hold.")]
        = False,
    explain: Annotated[Path | None, typer.Option(help="Write per-label attention maps (PNG) into this folder "
                                                         "(Query2Label models, torch engine).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 2,
    quiet: Annotated[bool, typer.Option(help="No progress bar or summary.")] = False,
) -> None:
    """Label images with scores, batch by batch: printed, or streamed to --jsonl/--csv (resumable)."""
    from mlic.data.labelset import LabelSet
    from mlic.engine.predict import Predictor, ResultWriter, list_images, read_path_list
    from mlic.engine.train import progress_bar

    predictor = Predictor(checkpoint, engine=engine)
    inputs = inputs or []
    if len(inputs) == 1 and (inputs[0] / "labelset.json").is_file() and path_list is None:
        labelset = LabelSet.load(inputs[0])
        paths = [labelset.path(i) for i in range(len(labelset))]
    else:
        paths = list_images(inputs) + (read_path_list(path_list) if path_list else [])
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, inputs)) or path_list or 'the arguments'}; "
                         "give image files, folders, a LabelSet folder or --list")
    if resume and not (jsonl or csv_out):
        raise ValueError("--resume needs --jsonl or --csv: the files to continue")
    if explain and not predictor.has_attention:
        raise ValueError("--explain needs a Query2Label model on the torch engine")
    writer = ResultWriter(predictor.classes, jsonl, csv_out, resume)
    todo = [p for p in paths if not writer.skip(str(p))]
    to_files = bool(jsonl or csv_out)
    if resume:
        typer.echo(f"resuming: {len(paths) - len(todo)} of {len(paths)} images already written", err=True)
    bar = progress_bar(-(-len(todo) // batch_size), f"predict ({predictor.engine.name})",
                       enabled=to_files and not quiet and sys.stderr.isatty())
    done = bad = 0
    t0 = time.perf_counter()
    try:
        for batch in predictor.stream(todo, batch_size, workers, threshold, top_k):
            writer.write(batch)
            for r in batch:
                if r.error:
                    bad += 1
                    typer.echo(f"{r.path}\terror: {r.error}", err=True)
                elif not to_files:
                    typer.echo(f"{r.path}\t" + (", ".join(f"{c} {s:.3f}" for c, s in r.labels) if r.labels
                                                 else "(no label above threshold)"))
                if explain and not r.error:
                    from mlic.models.explain import write_attention_png

                    png = explain / f"{Path(r.path).stem}_attention.png"
                    write_attention_png(predictor.model, r.path, png, predictor.classes, max_labels=top_k or 12,
                                        thresholds=predictor.thresholds if threshold is None else threshold)
                    typer.echo(f"attention maps: {png}")
            done += len(batch)
            bar.advance(f"{done / (time.perf_counter() - t0):.0f} images/s")
    finally:
        bar.close()
        writer.close()
    if not quiet and to_files:
        seconds = time.perf_counter() - t0
        typer.echo(f"{done} images in {seconds:.1f}s ({done / max(seconds, 1e-9):.1f} images/s), {bad} unreadable; "
                   f"wrote {', '.join(str(p) for p in (jsonl, csv_out) if p)}", err=True)
    if todo and bad == len(todo):
        sys.exit(2)


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
) -> None:
    """Export to ONNX (uint8 images in, probabilities out, normalisation inside) and check it against PyTorch."""
    from mlic.engine.checkpoint import load_model
    from mlic.export import PARITY_TOLERANCE, export_onnx

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
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the service to the network.")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    engine: Annotated[str | None, typer.Option(help="torch or onnx (default: from the checkpoint's file type).")]
        = None,
    max_batch: Annotated[int, typer.Option(help="Most images per forward pass; 1 turns batching off.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits to share a forward pass.")] = 5.0,
    max_files: Annotated[int, typer.Option(help="Most images per request.")] = 16,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MB.")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image in pixels (width x height).")] = 40_000_000,
    api_key: Annotated[str | None, typer.Option(envvar="MLIC_API_KEY", help="Require 'Authorization: Bearer KEY' "
                                                                            "on /v1/ routes.")] = None,
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /v1/model, GET /healthz, and a web page at /."""
    import uvicorn

    from mlic.engine.predict import Predictor
    from mlic.serve.app import ServeConfig, create_app

    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb,
                         max_pixels=max_pixels, max_files=max_files, api_key=api_key or None)
    predictor = Predictor(checkpoint, engine=engine)
    app_ = create_app(predictor, config)
    typer.echo(f"serving {checkpoint} ({predictor.engine.name}, {len(predictor.classes)} classes) on "
               f"http://{host}:{port}/ {'with' if api_key else 'without'} an API key", err=True)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
@user_errors
def prepare(
    kind: Annotated[str, typer.Argument(help="Data set kind: coco, voc, nuswide, cub, table, or cole (Cole et al.'s "
                                              "formatted_*.npy files).")],
    root: Annotated[Path, typer.Option(help="The data set folder (for table: the CSV/TSV/JSON file).")],
    out: Annotated[Path, typer.Option(help="Folder receiving one LabelSet folder per split.")],
    observe: Annotated[str | None, typer.Option(help="Also store simulated observed train labels: single-positive "
                                                     "or partial:P.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the observation draw and the validation hold-out.")] = 1200,
    val_fraction: Annotated[float, typer.Option(help="Hold this share of train out as val/ (Cole et al.: 0.2); "
                                                     "the official held-out split becomes test/.")] = 0.0,
    option: Annotated[list[str] | None, typer.Option(help="Reader option KEY=VALUE (repeatable): coco order=cole|all; "
                                                          "voc year=2007 difficult=unknown|positive|negative "
                                                          "source=xml|lists; nuswide drop_missing=true; cub "
                                                          "min_certainty=1; table images=DIR val=FILE test=FILE "
                                                          "classes=[a,b]; cole images=DIR classes=[...].")] = None,
) -> None:
    """Read a data set on disk into mlic's LabelSet folders (train/ val/ test/), ready for 'mlic train --data'."""
    from mlic.data.labelset import LabelSet
    from mlic.data.prepare import prepare as run_prepare

    written = run_prepare(kind, root, out, observe=observe, seed=seed, val_fraction=val_fraction,
                          **parse_kv(option, "--option"))
    for split, folder in written.items():
        ls = LabelSet.load(folder)
        known = (ls.targets != -1).mean() * 100
        typer.echo(f"{split:5s} {len(ls):7d} images  {ls.num_classes} classes  "
                   f"{(ls.targets == 1).sum(1).mean():.2f} positives/image  {known:.1f}% labels known"
                   f"{'  + observed labels' if ls.observed is not None else ''}  -> {folder}")


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
    from mlic.models.official import convert_query2label

    names = [line.strip() for line in classes.read_text().splitlines() if line.strip()] if classes else None
    out = convert_query2label(folder, output, names)
    typer.echo(f"wrote {out}/model.safetensors and model.json; evaluate with: mlic eval --checkpoint {out} --data ...")


def main() -> None:
    """Entry point of the ``mlic`` console script."""
    app()


if __name__ == "__main__":
    main()
