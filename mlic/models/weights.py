"""Reading weight files and the one strict check every loader uses (checkpoints, backbones, importers).

Also where pretrained backbone weights come from: a local file, or a file in the Hugging Face cache
(:func:`hub_weights`), each resolved to :class:`PretrainedWeights` (path, source, SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlic.errors import MlicError
from mlic.io import UnsafeFileError, load_torch_weights


class WeightsError(MlicError):
    """A weight file cannot be read or does not fit the model; the message names the file."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a local ``.safetensors`` or torch file without unpickling arbitrary objects.

    A torch file may hold the state dict itself or under ``state_dict`` / ``model`` / ``module``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any decoding failure becomes one clear line
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {reason})") from None
    try:
        obj = load_torch_weights(path)
    except UnsafeFileError as e:
        raise WeightsError(str(e)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return obj


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> dict:
    """Remove wrapper prefixes left by DDP and torch.compile."""
    out = {}
    for k, v in state_dict.items():
        for p in prefixes:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, torch.Tensor],
                     source: str | Path, what: str = "the model", ignore: Callable[[str], bool] | None = None,
                     error: type[MlicError] = WeightsError) -> dict[str, torch.Tensor]:
    """The one strict state-dict check: the same keys as ``model``'s state dict, each of the same shape.

    Args:
        state: the weights read from ``source``.
        model: the module (or its state dict) they must fit.
        source: the file, named in the message.
        what: what the weights are for, e.g. "this backbone; check --backbone".
        ignore: keys of ``model`` that may be absent (e.g. a classifier that is replaced).
        error: the error class to raise.

    Returns:
        ``state`` as a dict, ready for ``load_state_dict(..., strict=not ignore)``.

    Raises:
        ``error``: one line naming the file and up to three keys of each kind of misfit.
    """
    own = model.state_dict() if isinstance(model, nn.Module) else model
    ignored = ignore or (lambda key: False)
    missing = sorted(k for k in own if k not in state and not ignored(k))
    unexpected = sorted(k for k in state if k not in own)
    shape = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape:
        parts = []
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                detail = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in keys[:3]] \
                    if kind == "shape mismatch" else keys[:3]
                parts.append(f"{len(keys)} {kind}: {detail}{' ...' if len(keys) > 3 else ''}")
        raise error(f"{source}: weights do not fit {what} (" + "; ".join(parts) + ")")
    return dict(state)


@dataclass(frozen=True)
class PretrainedWeights:
    """Backbone weights resolved to one local file: what a backbone loads, and what a run records about it."""

    path: Path
    """The local weight file (inside the Hugging Face cache for ``timm`` and ``hf-hub:`` weights)."""
    source: str
    """Where the file came from: ``file:/abs/path``, ``hf-hub:ORG/NAME@COMMIT`` or
    ``timm:ARCH.TAG (hf-hub:ORG/NAME@COMMIT)``; the ``hf-hub:`` part is itself a valid ``--pretrained``."""
    sha256: str
    """SHA-256 of the file's bytes, hex."""


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The files a Hub repository of timm weights holds, in the order timm tries them."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def local_weights(path: str | Path) -> PretrainedWeights:
    """A local weight file as :class:`PretrainedWeights` (``source`` ``file:/abs/path``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; pass the weight file (.safetensors or torch) inside it")
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    path = path.resolve()
    return PretrainedWeights(path, f"file:{path}", file_sha256(path))


def hub_settings() -> tuple[Path, bool]:
    """The Hugging Face cache folder and whether the Hub is offline, read from the environment now.

    huggingface_hub reads ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` once, when it is imported; this
    follows its rules at call time, so a setting made afterwards (by a launcher, or a test) is honoured too.
    """
    from huggingface_hub import constants

    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                  "huggingface")
        cache = os.path.join(home, "hub")
    offline_env = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    offline = offline_env.upper() in constants.ENV_VARS_TRUE_VALUES or constants.HF_HUB_OFFLINE
    return Path(os.path.expandvars(os.path.expanduser(cache))), offline


def hub_weights(repo_id: str, revision: str | None, what: str,
                filenames: tuple[str, ...] = HUB_WEIGHT_FILES) -> PretrainedWeights:
    """The first of ``filenames`` a Hub repository holds, through huggingface_hub's download and cache.

    Args:
        repo_id: ``ORG/NAME``.
        revision: a branch, tag or commit; None for ``main``.
        what: what the weights are, first in every message (``hf-hub:ORG/NAME``, a timm model name).
        filenames: the files to try, in order.

    Returns:
        The cached file; ``source`` is ``hf-hub:ORG/NAME@COMMIT``, with the commit the cache holds.

    Raises:
        WeightsError: one line: not cached while offline or unreachable (what to download and where), no such
            repository, revision or file.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_settings()
    at = f" (revision {revision})" if revision else ""
    not_cached = offline_now = False
    for filename in filenames:
        try:
            found = Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache,
                                         local_files_only=offline or offline_now, library_name="mlic"))
        except LocalEntryNotFoundError:  # not in the cache, and offline or the Hub unreachable
            not_cached = True
            offline_now = True  # unreachable once (after huggingface_hub's retries): look only in the cache now
            continue
        except EntryNotFoundError:  # the Hub answered: no such file in this repository
            continue
        except HFValidationError:
            raise WeightsError(f"{what}: '{repo_id}' is not a Hugging Face Hub repository name; "
                               "pass hf-hub:ORG/NAME[@REVISION]") from None
        except RevisionNotFoundError:
            raise WeightsError(f"{what}: the Hub repository {repo_id} has no revision '{revision}'; "
                               "pass hf-hub:ORG/NAME@BRANCH_TAG_OR_COMMIT") from None
        except RepositoryNotFoundError:
            raise WeightsError(f"{what}: no Hugging Face Hub repository {repo_id} (or it is private or gated: "
                               "log in with `hf auth login`); check the name") from None
        except (HfHubHTTPError, OSError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            raise WeightsError(f"{what}: could not download {filename} from {repo_id}{at} "
                               f"({type(e).__name__}: {reason})") from None
        return _cached_weights(found, repo_id, what)
    if not not_cached:
        raise WeightsError(f"{what}: the Hub repository {repo_id}{at} holds none of {', '.join(filenames)}; "
                           "pass a repository of timm weights, or --pretrained FILE")
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    why = "HF_HUB_OFFLINE=1" if offline else "the Hub cannot be reached"
    absent = "" if folder.is_dir() else f", and no {folder.name} there: check the name"
    rev = f" --revision {revision}" if revision else ""
    raise WeightsError(f"{what}: pretrained weights not in the Hugging Face cache ({cache}{absent}) and {why}; "
                       f"download them on a machine with access: `hf download {repo_id} {filenames[0]}{rev}` and "
                       f"copy {folder} into this cache (set HF_HOME or HF_HUB_CACHE to where it is), "
                       "or pass --pretrained FILE")


def _cached_weights(path: Path, repo_id: str, what: str) -> PretrainedWeights:
    """A file hf_hub_download returned (``.../snapshots/COMMIT/FILENAME``), hashed and checked against its blob."""
    commit = path.parent.name if path.parent.parent.name == "snapshots" else "unknown"
    sha256 = file_sha256(path)
    blob = path.resolve().name  # a large (LFS) file's blob is named by the SHA-256 of its content
    if re.fullmatch(r"[0-9a-f]{64}", blob) and blob != sha256:
        raise WeightsError(f"{what}: the cached {path} is damaged (its SHA-256 is not its blob's {blob}); "
                           f"delete {path.resolve()} and download it again")
    return PretrainedWeights(path, f"hf-hub:{repo_id}@{commit}", sha256)
