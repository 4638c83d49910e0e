"""The authors' released checkpoints converted into mlic model folders (safetensors + model.json), strictly."""

from __future__ import annotations

from pathlib import Path

from mlic.engine.checkpoint import save_model
from mlic.engine.run_folder import claim_model_dir


def convert_query2label(folder: str | Path, out_dir: str | Path, classes: list[str] | None = None) -> Path:
    """Convert an official Query2Label release folder (checkpoint.pkl + config_new.json) into an mlic model
    directory (``model.safetensors`` + ``model.json``); ``classes`` default to COCO's 80 when num_class is 80."""
    from mlic.models.official import load_release, read_official_config

    folder = Path(folder)
    model, classes, config_path = load_release(folder, classes)
    claim_model_dir(out_dir)
    extra = {"source": {"repo": "SlongLiu/query2labels", "folder": str(folder),
                        "config": read_official_config(config_path)}}
    return save_model(out_dir, model, model.config, list(classes), extra=extra)


def convert_ml_decoder(path: str | Path, out_dir: str | Path, classes: list[str] | None = None,
                       img_size: int | None = None) -> Path:
    """Convert an authors' ML-Decoder ``.pth`` into an mlic model folder; arguments as
    :func:`mlic.models.official.load_ml_decoder`."""
    from mlic.models.official import load_ml_decoder

    model, classes = load_ml_decoder(path, classes, img_size)
    claim_model_dir(out_dir)
    extra = {"source": {"repo": "Alibaba-MIIL/ML_Decoder", "file": str(path)}}
    return save_model(out_dir, model, model.config, classes, extra=extra)
