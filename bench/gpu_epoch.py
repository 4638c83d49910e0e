"""One GPU, COCO-size training: mlic beside the official code, each row measured in the same run.

Prints one table: for each row our images/s, the baseline's, their ratio, the GPU's utilisation over each
timed window and the share of the limit reached (images/s × FLOPs per image ÷ the GPU's dense bf16 rate;
training counts 3 forward passes, inference 1; FLOPs from ``torch.utils.flop_counter`` on one image).
The last line is a JSON object with every figure.

Data: synthetic COCO-shaped JPEGs (640x480 and 640x427, quality 90, smooth colour fields plus grain, about
COCO's bytes per image), 80 classes, 1 to 6 positives per image (mean near COCO's 2.9), one observed positive
each, written once into ``--data`` in the layout of Cole et al.'s ``format_coco.py`` (``data/coco/
formatted_{train,val}_{images,labels,labels_obs}.npy``, ``data/coco/{train,val}2014/COCO_*.jpg``), so both
sides read the same files; mlic reads them through ``mlic prepare cole`` (``--data/mlic``).

What is timed. Every timed window starts after ``--warmup`` steps (each side synchronises the GPU, then the
clock starts) and covers ``--steps`` whole steps, data waits included; the loaders' workers start before it.

1. Cole et al. fine-tuning, ResNet-50 at 448, batch 16, from the JPEG files, loss AN ("assume negative").
   Ours: the steps of ``mlic train --data DATA/mlic --backbone resnet50 --head linear --img-size 448 --loss an
   --batch-size 16 --augment flip --amp bf16 --workers N`` (channels-last is mlic's default), once with the
   CPU workers decoding and once with ``--decode-device cuda``: the very :class:`mlic.engine.loop.ImageSteps`
   that ``mlic train`` builds (through :func:`mlic.engine.job.make_job`), its ``train_one_epoch`` (loader,
   normalise, forward, loss, backward, clip, AdamW, OneCycle); validation and checkpoints are outside the
   window. ``--compile`` adds a variant with ``torch.compile`` on the network (not an ``mlic train`` option).
   Baseline: the official ``train.py``'s ``run_train_phase`` on the same files, in a fresh process with
   ``cwd = DATA`` (its paths are relative): ``initialize_training_run`` with the P dictionary of its
   ``end_to_end`` mode (loss ``an``, batch 16, lr 1e-5, ``num_workers`` N, PIL resize to 448 + flip, fp32,
   as it is written), the train loader wrapped to hand out ``warmup + steps`` batches and time them.
2. Query2Label R101-448 training step, release head (hidden 2048, FFN 8192, 1 encoder + 2 decoder layers,
   4 heads; conv1/bn1/layer1 frozen), batch ``--q2l-batch``, tensors resident on the GPU, 80 classes.
   Ours: :func:`bench.q2l_train.build` (mlic's model), bf16 autocast, channels-last, mlic's ASL (γ-=2, γ+=0,
   clip 0), fused AdamW, OneCycle, :class:`mlic.optim.EMA` 0.9997. Baseline: the official ``main_mlc.py``'s
   ``train()`` function, given the objects its ``main_worker`` builds (``build_q2l``, ``ModelEma``, DDP on
   one rank, ``AsymmetricLossOptimized``, AdamW, OneCycleLR) and ``--amp`` (fp16 autocast + GradScaler).
3. The data path alone: the training JPEGs → random-resized-crop (0.7–1) + flip at 448 → normalised float
   batches of ``--data-batch`` on the GPU. Ours: mlic's loader (:class:`~mlic.data.images.ImageDataset`,
   :func:`~mlic.data.images.make_loader`, N workers), and ``--decode-device cuda`` (workers read bytes,
   :func:`mlic.data.gpu_decode.decode_batch`). Baseline: ``torchvision.datasets.ImageFolder`` with PIL,
   ``RandomResizedCrop`` / ``RandomHorizontalFlip`` / ``ToTensor`` / ``Normalize``, the same N workers,
   pinned memory. Reference: the rate of ResNet-50 training at 448 on resident tensors (mlic's model,
   bf16, channels-last, batch ``--data-batch``), which the data path must reach so the GPU is not starved.
4. ``mlic serve``, ``--clients`` concurrent clients posting one 640x480 JPEG each, ResNet-50 at 224 on the
   GPU: ``bench/serve_load.py``'s server and clients, batching on (max batch 32, 5 ms) against off (max
   batch 1), ``--seconds`` each after a 2 s warm-up.

Official code: pass the checkouts by path (nothing of them is stored in mlic). ``--cole`` needs
``train.py``, ``models.py``, ``datasets.py``, ``losses.py``, ``instrumentation.py``, ``metrics.py``;
``--q2l`` needs ``main_mlc.py``, ``_init_paths.py``, ``lib/models/query2label.py``, ``lib/models/aslloss.py``.
They run unmodified in this Python; the bench only (a) restores the NumPy 1 aliases Cole's code uses
(``np.bool``, ``np.Inf``) when NumPy 2 lacks them, (b) gives Query2Label's backbone random weights instead of
its ImageNet download (weights do not change speed), and (c) stands in for modules the official imports
name but the timed step never runs (termcolor, addict, yapf, randaugment, einops, tensorboard) when they are
not installed; the stand-ins used are printed.

Usage (H200, about 5 minutes; see docs/gpu.md)::

    PYTHONPATH=. python bench/gpu_epoch.py --data /scratch/gpu-epoch --cole ~/src/single-positive-multi-label \\
        --q2l ~/src/query2labels
    PYTHONPATH=. python bench/gpu_epoch.py --smoke --data /tmp/gpu-epoch-smoke   # CPU check, tiny sizes
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NUM_CLASSES = 80
DATA_VERSION = 2
RESULT_TAG = "GPU_EPOCH_RESULT "
PEAK_BF16_TFLOPS = {  # dense (no sparsity) bf16 tensor-core rate, by a substring of torch.cuda.get_device_name()
    "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "H20": 148.0,
    "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "A6000": 155.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
}
COLE_FILES = ("train.py", "models.py", "datasets.py", "losses.py", "instrumentation.py", "metrics.py")
Q2L_FILES = ("main_mlc.py", "_init_paths.py", "lib/models/query2label.py", "lib/models/aslloss.py")


def fail(message: str) -> None:
    """A user's mistake: one line, exit code 2."""
    print(f"gpu_epoch: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class Sizes:
    """How big each part of the run is (the GPU defaults, or ``--smoke``'s)."""

    images: int
    val_images: int
    img_size: int
    batch: int
    q2l_batch: int
    data_batch: int
    warmup: int
    steps: int
    q2l_steps: int
    data_steps: int
    workers: int
    clients: int
    seconds: float
    serve_size: int


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        base = Sizes(images=24, val_images=4, img_size=224, batch=2, q2l_batch=1, data_batch=2, warmup=0, steps=2,
                     q2l_steps=2, data_steps=2, workers=1, clients=4, seconds=1.0, serve_size=224)
    else:
        base = Sizes(images=8000, val_images=200, img_size=448, batch=16, q2l_batch=64, data_batch=64, warmup=20,
                     steps=200, q2l_steps=30, data_steps=60, workers=max(1, min(16, (os.cpu_count() or 2) - 1)),
                     clients=64, seconds=20.0, serve_size=224)
    given = {k: getattr(args, k) for k in ("images", "workers", "steps", "warmup", "clients", "seconds")
             if getattr(args, k) is not None}
    return replace(base, **given)


# ---------------------------------------------------------------- synthetic COCO-shaped data (Cole's layout)

def image_name(split: str, i: int) -> str:
    return f"{split}2014/COCO_{split}2014_{i:012d}.jpg"


def write_jpeg(job: tuple[str, int]) -> int:
    from PIL import Image

    path, i = job
    rng = np.random.default_rng(i)
    width, height = 640, (480 if i % 2 == 0 else 427)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 18, (height, width, 1)).astype(np.int16)  # ~150 kB a file, as COCO's
    Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def write_data(folder: Path, n_train: int, n_val: int, workers: int) -> Path:
    """Cole et al.'s formatted COCO layout under ``folder/data/coco`` (written once; reused when it matches)."""
    coco = folder / "data" / "coco"
    manifest = {"version": DATA_VERSION, "train": n_train, "val": n_val, "classes": NUM_CLASSES}
    stamp = coco / "gpu_epoch.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == manifest:
        return coco
    jobs = []
    for split, count, offset in (("train", n_train, 0), ("val", n_val, 10_000_000)):
        (coco / f"{split}2014").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1 + offset)
        labels = np.zeros((count, NUM_CLASSES), np.float64)
        observed = np.zeros((count, NUM_CLASSES), np.float64)
        for row in range(count):
            positives = rng.choice(NUM_CLASSES, size=int(np.clip(1 + rng.poisson(1.9), 1, 6)), replace=False)
            labels[row, positives] = 1
            observed[row, rng.choice(positives)] = 1  # single positive; 0 = unobserved in their encoding
        names = [image_name(split, offset + row) for row in range(count)]
        np.save(coco / f"formatted_{split}_labels.npy", labels)
        np.save(coco / f"formatted_{split}_labels_obs.npy", observed)
        np.save(coco / f"formatted_{split}_images.npy", np.asarray(names, dtype=str))
        jobs += [(str(coco / name), offset + row) for row, name in enumerate(names)]
    from multiprocessing import Pool

    print(f"writing {len(jobs)} synthetic COCO-shaped JPEGs into {coco} ...", flush=True)
    with Pool(max(1, workers)) as pool:
        sizes = pool.map(write_jpeg, jobs, chunksize=64)
    print(f"  {np.mean(sizes) / 1000:.0f} kB per image on average", flush=True)
    stamp.write_text(json.dumps(manifest))
    return coco


def prepared(folder: Path, coco: Path) -> Path:
    """The same files as an mlic data folder (``mlic prepare cole``)."""
    from mlic.data.prepare import prepare

    out = folder / "mlic"
    prepare("cole", coco, out)
    return out


# ---------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_identifier() -> str:
    """The GPU torch calls cuda:0, as NVML and nvidia-smi name it (CUDA_VISIBLE_DEVICES may renumber)."""
    try:
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    except (AttributeError, RuntimeError):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        return visible or "0"


class GpuUtilization:
    """GPU utilisation (%) sampled every 100 ms from :meth:`start` to :meth:`stop`: NVML (pynvml) when it
    imports, else a streaming ``nvidia-smi``; :meth:`mean` averages the samples inside a timed window and is
    None where neither is available (or on a CPU run)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> GpuUtilization:
        if not self.enabled:
            return self
        ident = gpu_identifier()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByUUID(ident) if ident.startswith("GPU-")
                      else pynvml.nvmlDeviceGetHandleByIndex(int(ident)))

            def poll() -> None:
                while not self._done.wait(0.1):
                    self.samples.append((time.perf_counter(), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
        except Exception:  # no pynvml, or NVML refuses: the command-line tool
            try:
                self._proc = subprocess.Popen(["nvidia-smi", "-i", ident, "--query-gpu=utilization.gpu",
                                               "--format=csv,noheader,nounits", "-lms", "100"],
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                return self

            def poll() -> None:
                for line in self._proc.stdout:
                    try:
                        self.samples.append((time.perf_counter(), float(line.strip())))
                    except ValueError:
                        pass
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
        if self._thread is not None:
            self._thread.join(5)

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return float(np.mean(inside)) if inside else None


class TimedBatches:
    """Hands out ``warmup + steps`` batches of ``source`` to a training loop that is not ours and times the
    last ``steps``: the window opens when batch ``warmup`` is asked for (the device synchronised) and closes
    when the loop asks past the last one, i.e. when its last step has run."""

    def __init__(self, source, warmup: int, steps: int, device: torch.device) -> None:
        self.source, self.warmup, self.steps, self.device = source, warmup, steps, device
        self.t0 = self.t1 = None

    def __len__(self) -> int:
        return self.warmup + self.steps

    def __iter__(self):
        batches = iter(self.source)
        for i in range(self.warmup + self.steps):
            if i == self.warmup:
                sync(self.device)
                self.t0 = time.perf_counter()
            try:
                yield next(batches)
            except StopIteration:
                return
        sync(self.device)
        self.t1 = time.perf_counter()


class StepWindow:
    """The progress bar :meth:`mlic.engine.loop.ImageSteps.train_one_epoch` advances once per step, used as
    the clock: the window opens after step ``warmup`` and closes after step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device, self.done = warmup, steps, device, 0
        self.t0 = self.t1 = None
        if warmup == 0:
            self.t0 = time.perf_counter()

    def advance(self, text: str | None = None, count: int = 1) -> None:
        self.done += count
        if self.done == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
        elif self.done == self.warmup + self.steps:
            sync(self.device)
            self.t1 = time.perf_counter()

    def close(self) -> None:
        pass


def forward_flops(model: torch.nn.Module, img_size: int, device: torch.device) -> float:
    """FLOPs of one forward pass on one image (multiply-adds count 2), train mode kept as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    model.train(was_training)
    return float(counter.get_total_flops())


def figure(images: int, t0: float | None, t1: float | None, util: GpuUtilization, flops: float, what: str) -> dict:
    if t0 is None or t1 is None:
        return {"error": f"{what}: the timed window did not close (fewer batches than warm-up + steps; "
                         "give more --images)"}
    return {"images_per_s": images / (t1 - t0), "seconds": t1 - t0, "gpu_util": util.mean(t0, t1),
            "flops_per_image": flops}


# ---------------------------------------------------------------- row 1: Cole et al.'s fine-tuning

def ours_finetune(data: Path, size: Sizes, device: torch.device, decode_device: str, compile_net: bool) -> dict:
    from mlic.engine.job import make_job
    from mlic.engine.loop import EpochProgress, ImageSteps
    from mlic.engine.threads import choose_threads

    out = Path(tempfile.mkdtemp(prefix="mlic-gpu-epoch-")) / "run"
    job = make_job(data=data, out=out, backbone="resnet50", head="linear", img_size=size.img_size, loss="an",
                   batch_size=size.batch, lr=1e-5, amp="bf16" if device.type == "cuda" else "off", augment="flip",
                   workers=size.workers, decode_device=decode_device, epochs=1, quiet=True, overwrite=True,
                   log=lambda *a, **k: None)
    threads, workers = choose_threads(job.train.workers, job.train.threads)  # as mlic.engine.run.run does
    torch.set_num_threads(threads)
    job = replace(job, train=replace(job.train, workers=workers, threads=threads))
    steps = ImageSteps(job, 0, 1, device, lambda *a, **k: None)
    total = size.warmup + size.steps
    if len(steps.loader) < total:
        return {"error": f"{len(steps.loader)} batches per epoch, fewer than warm-up + steps = {total}; "
                         "give more --images"}
    steps.epoch_steps = [total]
    if compile_net:
        steps.net = torch.compile(steps.model)
    flops = forward_flops(steps.model, size.img_size, device)
    window = StepWindow(size.warmup, size.steps, device)
    util = GpuUtilization(device.type == "cuda").start()
    try:
        steps.train_one_epoch(0, 0, EpochProgress(), steps.train_check(1.0, False), window, lambda *a: None)
    finally:
        util.stop()
    return figure(size.steps * size.batch, window.t0, window.t1, util, 3 * flops, "mlic train")


def numpy_aliases() -> None:
    """The NumPy 1 names Cole et al.'s code uses, where NumPy 2 removed them (nothing else is changed)."""
    for name, value in (("bool", bool), ("Inf", np.inf)):
        if name not in np.__dict__:
            setattr(np, name, value)


def child_cole(spec: dict) -> dict:
    """Run in a fresh process: the official ``run_train_phase`` on the synthetic files, timed."""
    os.chdir(spec["root"])  # its data paths ('data/coco') are relative to the working directory
    sys.path.insert(0, spec["checkout"])
    numpy_aliases()
    import instrumentation  # the official checkout's modules, from sys.path[0]
    import train

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # as its initialize_training_run
    params = {
        "dataset": "coco", "loss": "an", "train_mode": "end_to_end", "val_set_variant": "clean",
        "experiment_name": "gpu_epoch", "load_path": "./data", "save_path": spec["save"], "lr_mult": 10.0,
        "stop_metric": "map", "ls_coef": 0.1, "seed": 1200, "use_pretrained": False, "num_workers": spec["workers"],
        "split_seed": 1200, "val_frac": 0.2, "ss_seed": 999, "ss_frac_train": 1.0, "ss_frac_val": 1.0,
        "train_set_variant": "observed", "num_epochs": 1, "freeze_feature_extractor": False, "use_feats": False,
        "arch": "resnet50", "feature_extractor_arch": "resnet50", "feat_dim": 2048, "expected_num_pos": 2.9,
        "bsize": spec["batch"], "lr": 1e-5,
    }
    params, z, model = train.initialize_training_run(params, None, None, None)
    model.to(z["device"])
    logger = instrumentation.train_logger(params)
    timed = TimedBatches(z["dataloaders"]["train"], spec["warmup"], spec["steps"], device)
    z["dataloaders"]["train"] = timed
    flops = forward_flops(model.f, 448, device)
    util = GpuUtilization(device.type == "cuda").start()
    try:
        train.run_train_phase(model, params, z, logger, 0, "train")
    finally:
        util.stop()
    return figure(spec["steps"] * spec["batch"], timed.t0, timed.t1, util, 3 * flops, "official train.py")


# ---------------------------------------------------------------- row 2: Query2Label's training step

def ours_q2l(size: Sizes, device: torch.device) -> dict:
    sys.path.insert(0, str(BENCH))
    from q2l_train import build

    from mlic.losses.full import ASL
    from mlic.optim import EMA

    torch.manual_seed(0)
    model = build(size.img_size, NUM_CLASSES, True, device)
    ema = EMA(model, 0.9997)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 1e-2},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=device.type == "cuda")
    total = size.warmup + size.q2l_steps
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-4, total_steps=total + 1, pct_start=0.2)
    loss_fn = ASL(gamma_neg=2, gamma_pos=0, clip=0, eps=1e-5, scale=1000)
    images = torch.randn(size.q2l_batch, 3, size.img_size, size.img_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(size.q2l_batch, NUM_CLASSES, device=device) < 0.04).to(torch.int8)
    flops = forward_flops(model, size.img_size, device)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update(model)

    model.train()
    return timed_steps(step, size.warmup, size.q2l_steps, size.q2l_batch, device, 3 * flops)


def timed_steps(step, warmup: int, steps: int, batch: int, device: torch.device, flops: float) -> dict:
    for _ in range(warmup):
        step()
    util = GpuUtilization(device.type == "cuda").start()
    try:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        t1 = time.perf_counter()
    finally:
        util.stop()
    return figure(steps * batch, t0, t1, util, flops, "steps")


def stand_ins() -> dict[str, dict]:
    """Modules the official Query2Label imports name, by what to put in them where they are not installed:
    renamed homes (torchvision.models.utils, gone since torchvision 0.13) get the real function, modules the
    timed step never runs get names that refuse to be called."""
    return {"torchvision.models.utils": {"load_state_dict_from_url": torch.hub.load_state_dict_from_url},
            "termcolor": {"colored": _unused("termcolor.colored")}, "addict": {"Dict": type("Dict", (dict,), {})},
            "yapf": {}, "yapf.yapflib": {}, "yapf.yapflib.yapf_api": {"FormatCode": _unused("yapf FormatCode")},
            "randaugment": {"RandAugment": _unused("randaugment.RandAugment")}, "einops": {"rearrange":
            _unused("einops.rearrange")}, "einops.layers": {}, "einops.layers.torch": {"Rearrange":
            _unused("einops Rearrange")}, "torch.utils.tensorboard": {"SummaryWriter": _unused("SummaryWriter")}}


def stand_in_missing() -> list[str]:
    """Install :func:`stand_ins` for the modules that do not import; returns their names."""
    import importlib

    used = []
    for name, attributes in stand_ins().items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
            used.append(name)
    return used


def _unused(name: str) -> type:
    """A class (so it may be subclassed, called or instantiated at import) that refuses to be made."""
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in of gpu_epoch.py (the module is not installed)")
    return type(name.rsplit(".", 1)[-1], (), {"__init__": refuse, "__new__": lambda cls, *a, **k: refuse()})


def child_q2l(spec: dict) -> dict:
    """Run in a fresh process: the official ``main_mlc.train()`` on resident tensors, timed."""
    import torch.distributed as dist
    import torchvision

    checkout = spec["checkout"]
    sys.path[:0] = [checkout, os.path.join(checkout, "lib")]
    stand_ins = stand_in_missing()
    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):  # random weights, not the ImageNet download
        real = getattr(torchvision.models, name)
        setattr(torchvision.models, name, lambda *a, _real=real, pretrained=False, **k: _real(*a, weights=None, **k))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(spec["port"]))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)  # main_mlc.py always trains under DDP
    out = tempfile.mkdtemp(prefix="q2l-gpu-epoch-")
    sys.argv = ["main_mlc.py", "--amp", "-b", str(spec["batch"]), "--img_size", str(spec["img_size"]),
                "--output", out, "-j", "0", "--lr", "1e-4", "--epochs", "1", "--print-freq", "1000000000"]
    import main_mlc  # the official checkout's module, from sys.path[0]
    from models.aslloss import AsymmetricLossOptimized
    from models.query2label import build_q2l

    args = main_mlc.get_args()
    args.world_size, args.rank, args.local_rank = 1, 0, 0
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    # what main_worker builds, in its order
    model = build_q2l(args).cuda()
    ema_m = main_mlc.ModelEma(model, args.ema_decay)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0], broadcast_buffers=False)
    criterion = AsymmetricLossOptimized(gamma_neg=args.gamma_neg, gamma_pos=args.gamma_pos, clip=args.loss_clip,
                                        disable_torch_grad_focal_loss=args.dtgfl, eps=args.eps)
    args.lr_mult = args.batch_size / 256
    optimizer = torch.optim.AdamW([{"params": [p for p in model.module.parameters() if p.requires_grad]}],
                                  args.lr_mult * args.lr, betas=(0.9, 0.999), eps=1e-08,
                                  weight_decay=args.weight_decay)
    device = torch.device("cuda", 0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = (torch.rand(args.batch_size, args.num_class, device=device) < 0.04).float()
    timed = TimedBatches(itertools.repeat((images, target)), spec["warmup"], spec["steps"], device)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, steps_per_epoch=len(timed),
                                                    epochs=1, pct_start=0.2)
    flops = forward_flops(model.module, args.img_size, device)
    logger = logging.getLogger("gpu_epoch.q2l")
    logger.setLevel(logging.WARNING)
    util = GpuUtilization(True).start()
    try:
        main_mlc.train(timed, model, ema_m, criterion, optimizer, scheduler, 0, args, logger)
    finally:
        util.stop()
        dist.destroy_process_group()
    result = figure(spec["steps"] * args.batch_size, timed.t0, timed.t1, util, 3 * flops, "official main_mlc.py")
    result["stand_ins"] = stand_ins
    return result


# ---------------------------------------------------------------- row 3: the data path alone

def ours_data(data: Path, size: Sizes, device: torch.device, decode_device: str) -> dict:
    from mlic.config import ModelConfig
    from mlic.data.gpu_decode import collate_encoded, decode_batch, read_encoded
    from mlic.data.images import EpochOrder, ImageDataset, build_transform, make_loader, normalize
    from mlic.data.labelset import LabelSet

    train = LabelSet.load(data / "train")
    config = ModelConfig()
    dataset = ImageDataset(train, build_transform(size.img_size, True, "light"))
    order = EpochOrder(len(train), 0)
    order.set_epoch(0)
    loader = make_loader(dataset, size.data_batch, workers=size.workers, sampler=order, drop_last=True)
    if decode_device != "cpu":
        dataset.read, loader.collate_fn = read_encoded, collate_encoded

    def batches():
        for images, _, indices, _ in loader:
            if decode_device != "cpu":
                seeds = [order.sample_seed(row) for row in indices.tolist()]
                images, indices, _ = decode_batch(images, indices, dataset.transform, device, seeds)
            yield normalize(images.to(device, non_blocking=True), config.mean, config.std)

    return timed_loader(batches(), size, device)


def timed_loader(batches, size: Sizes, device: torch.device) -> dict:
    timed = TimedBatches(batches, size.warmup, size.data_steps, device)
    util = GpuUtilization(device.type == "cuda").start()
    try:
        for _ in timed:
            pass
    finally:
        util.stop()
    return figure(size.data_steps * size.data_batch, timed.t0, timed.t1, util, 0.0, "loader")


def baseline_data(coco: Path, size: Sizes, device: torch.device) -> dict:
    from torchvision import datasets, transforms

    from mlic.config import ModelConfig

    config = ModelConfig()
    transform = transforms.Compose([transforms.RandomResizedCrop(size.img_size, scale=(0.7, 1.0)),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(config.mean, config.std)])
    folder = datasets.ImageFolder(str(coco), transform=transform)  # its 'classes' are train2014 / val2014
    loader = torch.utils.data.DataLoader(folder, batch_size=size.data_batch, shuffle=True,
                                         num_workers=size.workers, pin_memory=device.type == "cuda",
                                         drop_last=True, persistent_workers=size.workers > 0)
    def batches():
        while True:  # epochs after epochs (itertools.cycle would keep every batch)
            for images, _ in loader:
                yield images.to(device, non_blocking=True)

    return timed_loader(batches(), size, device)


def resident_train_rate(size: Sizes, device: torch.device) -> dict:
    """mlic's ResNet-50 training step at ``img_size`` on a resident batch: what the data path must keep up with."""
    from mlic.config import ModelConfig
    from mlic.models.classifier import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet50", num_classes=NUM_CLASSES, img_size=size.img_size))
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    images = torch.randn(size.data_batch, 3, size.img_size, size.img_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(size.data_batch, NUM_CLASSES, device=device) < 0.04).float()
    flops = forward_flops(model, size.img_size, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed_steps(step, size.warmup, size.data_steps, size.data_batch, device, 3 * flops)


# ---------------------------------------------------------------- row 4: mlic serve

def serve_rows(size: Sizes, device: torch.device) -> tuple[dict, dict]:
    import asyncio

    import httpx

    sys.path.insert(0, str(BENCH))
    from serve_load import free_port, jpeg, load, serve

    from mlic.config import ModelConfig
    from mlic.engine.checkpoint import save_model
    from mlic.models.classifier import build_model

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    checkpoint = Path(tempfile.mkdtemp(prefix="mlic-gpu-epoch-serve-")) / "resnet50"
    config = ModelConfig(backbone="resnet50", num_classes=NUM_CLASSES, img_size=size.serve_size)
    model = build_model(config)
    save_model(checkpoint, model, config, [str(k) for k in range(NUM_CLASSES)])
    flops = forward_flops(model, size.serve_size, torch.device("cpu"))
    del model
    image = jpeg(640, 480)
    results = []
    for max_batch in (32, 1):
        port = free_port()
        proc = serve(checkpoint, port, max_batch, 5.0)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(load(url, size.clients, min(2.0, size.seconds), image))  # warm-up
            before = httpx.get(f"{url}/v1/model").json()["served"]
            util = GpuUtilization(device.type == "cuda").start()
            t0 = time.perf_counter()
            try:
                r = asyncio.run(load(url, size.clients, size.seconds, image))
            finally:
                t1 = time.perf_counter()
                util.stop()
            after = httpx.get(f"{url}/v1/model").json()["served"]
        finally:
            proc.terminate()
            proc.wait(30)
        batch = (after["images"] - before["images"]) / max(1, after["forward_passes"] - before["forward_passes"])
        results.append({"images_per_s": r["images_s"], "seconds": t1 - t0, "gpu_util": util.mean(t0, t1),
                        "flops_per_image": flops, "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                        "errors": r["errors"], "mean_batch": batch})
    return results[0], results[1]


# ---------------------------------------------------------------- baselines in their own process

def run_child(kind: str, spec: dict, timeout: float = 900) -> dict:
    """``python bench/gpu_epoch.py --_child KIND SPEC`` in a fresh process; its last tagged line, or an error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                                      if p])}
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", kind, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"error": f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"}


def child_main(kind: str, spec: dict) -> None:
    result = {"cole": child_cole, "q2l": child_q2l}[kind](spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the table

def check_checkout(option: str, path: Path | None, files: tuple[str, ...], repository: str) -> None:
    if path is None:
        return
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        fail(f"{option} {path}: expected a checkout of {repository} with {', '.join(files)}; "
             f"missing {', '.join(missing)}")


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOPS (--peak-tflops)"
    if device.type != "cuda":
        return None, "no GPU: no limit"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{value:g} TFLOPS dense bf16 ({name})"
    return None, f"{name}: rate unknown (give --peak-tflops)"


def cell(m: dict | None, key: str, peak: float | None) -> str:
    if m is None or "images_per_s" not in m:
        return "-"
    if key == "rate":
        return f"{m['images_per_s']:.1f}"
    if key == "util":
        return "n/a" if m.get("gpu_util") is None else f"{m['gpu_util']:.0f}%"
    if not m.get("flops_per_image") or peak is None:
        return "n/a"
    return f"{100 * m['images_per_s'] * m['flops_per_image'] / (peak * 1e12):.1f}%"


def print_table(rows: list[dict], peak: float | None) -> None:
    header = ("row", "variant", "ours img/s", "baseline img/s", "ours/baseline", "GPU util ours / base",
              "of limit ours / base")
    table = [header]
    for r in rows:
        ours, base = r.get("ours"), r.get("base")
        ratio = "-"
        if ours and base and "images_per_s" in ours and "images_per_s" in base:
            ratio = f"{ours['images_per_s'] / base['images_per_s']:.2f}x"
        table.append((r["row"], r["variant"], cell(ours, "rate", peak), cell(base, "rate", peak), ratio,
                      f"{cell(ours, 'util', peak)} / {cell(base, 'util', peak)}",
                      f"{cell(ours, 'limit', peak)} / {cell(base, 'limit', peak)}"))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    said = set()
    for r in rows:
        for side, label in (("ours", r["variant"]), ("base", "baseline")):
            m = r.get(side) or {}
            line = (f"not measured: {r['row']}, {label}: {m['skipped']}" if "skipped" in m else
                    f"failed: {r['row']}, {label}: {m['error']}" if "error" in m else None)
            if line and line not in said:
                said.add(line)
                print(line)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked where both figures exist."""
    def rate(row: str, variant: str | None, side: str) -> float | None:
        for r in rows:
            m = r.get(side) or {}
            if r["row"] == row and (variant is None or r["variant"] == variant) and "images_per_s" in m:
                return m["images_per_s"]
        return None

    lines = []
    for row, need in (("1 Cole fine-tuning", 2.0), ("2 Q2L train step", 2.0), ("4 mlic serve", 3.0)):
        best = max((r["ours"]["images_per_s"] / r["base"]["images_per_s"] for r in rows if r["row"] == row
                    and "images_per_s" in (r.get("ours") or {}) and "images_per_s" in (r.get("base") or {})),
                   default=None)
        if best is not None:
            lines.append(f"target {row}: >= {need:g}x: {'met' if best >= need else 'NOT met'} ({best:.2f}x)")
    fed = [rate("3 data path", v, "ours") for v in ("mlic loader, CPU workers", "mlic loader, --decode-device cuda")]
    fed = [v for v in fed if v is not None]
    model = next((r["ours"]["images_per_s"] for r in rows if r["variant"].startswith("reference")
                  and "images_per_s" in (r.get("ours") or {})), None)
    if fed and model:
        lines.append(f"target 3 data path: >= the training rate {model:.1f} img/s: "
                     f"{'met' if max(fed) >= model else 'NOT met'} ({max(fed):.1f} img/s)")
    return lines


def released(result: dict) -> dict:
    """``result``, once the measurement's model, loader workers and cached GPU memory are gone."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder for the synthetic JPEGs (written once, then reused)")
    parser.add_argument("--cole", type=Path, help="checkout of elijahcole/single-positive-multi-label")
    parser.add_argument("--q2l", type=Path, help="checkout of SlongLiu/query2labels")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run that checks the script")
    parser.add_argument("--rows", default="1,2,3,4", help="rows to run, e.g. 1,3")
    parser.add_argument("--images", type=int, help="training images to write (default 8000; --smoke 24)")
    parser.add_argument("--workers", type=int, help="loader workers, the same for both sides (default: cores-1)")
    parser.add_argument("--steps", type=int, help="timed steps of row 1 (default 200)")
    parser.add_argument("--warmup", type=int, help="steps before each timed window (default 20)")
    parser.add_argument("--clients", type=int, help="concurrent serve clients (default 64)")
    parser.add_argument("--seconds", type=float, help="seconds of serve load per side (default 20)")
    parser.add_argument("--compile", action="store_true", help="row 1: add a torch.compile variant of ours")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 rate, where the table lacks it")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child_main(args._child[0], json.loads(args._child[1]))
        return
    check_checkout("--cole", args.cole, COLE_FILES, "elijahcole/single-positive-multi-label")
    check_checkout("--q2l", args.q2l, Q2L_FILES, "SlongLiu/query2labels")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        fail("no CUDA GPU found; this benchmark measures GPU training (add --smoke for the tiny CPU check)")
    if args.data is None and args.smoke:
        args.data = Path(tempfile.mkdtemp(prefix="mlic-gpu-epoch-smoke-"))
    elif args.data is None:
        fail("--data FOLDER is needed: the synthetic JPEGs are written there (about 1.2 GB at the default size)")
    rows_wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    if not rows_wanted <= {"1", "2", "3", "4"}:
        fail(f"--rows {args.rows}: choose among 1, 2, 3, 4")
    device = torch.device("cuda" if cuda else "cpu")
    size = sizes_from(args)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak, peak_text = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"gpu_epoch: {name}; torch {torch.__version__}; {os.cpu_count()} cores; {size.workers} loader workers "
          f"each side; limit {peak_text}" + ("; --smoke: tiny sizes, figures mean nothing" if args.smoke else ""),
          flush=True)
    folder = args.data.resolve()
    coco = write_data(folder, size.images, size.val_images, size.workers or 1)
    data = prepared(folder, coco)
    rows: list[dict] = []
    no_gpu = {"skipped": "needs a CUDA GPU"}

    if "1" in rows_wanted:
        row = "1 Cole fine-tuning"
        print(f"row {row}: ResNet-50 at {size.img_size}, batch {size.batch}, {size.steps} steps ...", flush=True)
        if args.cole is None:
            base = {"skipped": "official train.py (give --cole PATH)"}
        else:
            base = run_child("cole", {"root": str(folder), "checkout": str(args.cole.resolve()), "workers":
                                      size.workers, "batch": size.batch, "warmup": size.warmup, "steps": size.steps,
                                      "save": tempfile.mkdtemp(prefix="cole-gpu-epoch-")})
        rows.append({"row": row, "variant": "mlic train, CPU workers", "base": base,
                     "ours": released(ours_finetune(data, size, device, "cpu", False))})
        rows.append({"row": row, "variant": "mlic train, --decode-device cuda", "base": base,
                     "ours": released(ours_finetune(data, size, device, "cuda", False)) if cuda else no_gpu})
        if args.compile:
            rows.append({"row": row, "variant": "mlic train, CPU workers, torch.compile", "base": base,
                         "ours": released(ours_finetune(data, size, device, "cpu", True))})
    if "2" in rows_wanted:
        row = "2 Q2L train step"
        print(f"row {row}: R101 at {size.img_size}, release head, batch {size.q2l_batch} ...", flush=True)
        if args.q2l is None:
            base = {"skipped": "official main_mlc.py (give --q2l PATH)"}
        elif not cuda:
            base = {"skipped": "the official main_mlc.py step needs CUDA (it calls .cuda() and NCCL)"}
        else:
            base = run_child("q2l", {"checkout": str(args.q2l.resolve()), "batch": size.q2l_batch,
                                     "img_size": size.img_size, "warmup": size.warmup, "steps": size.q2l_steps,
                                     "port": free_tcp_port()})
        rows.append({"row": row, "variant": "mlic step, bf16 channels-last", "base": base,
                     "ours": released(ours_q2l(size, device))})
    if "3" in rows_wanted:
        row = "3 data path"
        print(f"row {row}: JPEG -> augmented {size.img_size} batches of {size.data_batch} on {device.type} ...",
              flush=True)
        base = released(baseline_data(coco, size, device))
        rows.append({"row": row, "variant": "mlic loader, CPU workers", "base": base,
                     "ours": released(ours_data(data, size, device, "cpu"))})
        rows.append({"row": row, "variant": "mlic loader, --decode-device cuda", "base": base,
                     "ours": released(ours_data(data, size, device, "cuda")) if cuda else no_gpu})
        rows.append({"row": row, "variant": "reference: ResNet-50 train step, resident batch", "base": None,
                     "ours": released(resident_train_rate(size, device))})
    if "4" in rows_wanted:
        row = "4 mlic serve"
        print(f"row {row}: {size.clients} clients, ResNet-50 at {size.serve_size} ...", flush=True)
        on, off = serve_rows(size, device)
        rows.append({"row": row, "variant": f"batching on vs off, {size.clients} clients", "ours": on, "base": off})
    print()
    print_table(rows, peak)
    for line in targets(rows) if not args.smoke else ["targets: not judged under --smoke"]:
        print(line)
    stand_ins = [n for r in rows for n in (r.get("base") or {}).get("stand_ins", [])]
    if stand_ins:
        print(f"Query2Label imports stood in for (not installed, not used by the step): {', '.join(stand_ins)}")
    print(json.dumps({"bench": "gpu_epoch", "device": name, "torch": torch.__version__, "smoke": args.smoke,
                      "peak_tflops": peak, "sizes": size.__dict__, "rows": rows}))


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
