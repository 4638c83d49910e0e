"""The registry tables of mlic: losses, heads, backbones and data-set readers, each a plain dict.

Members register themselves with a decorator (``@register_loss("bce")``) in their own module; each
package's ``__init__`` imports its member modules (``mlic.losses``, ``mlic.models``, ``mlic.data``),
so importing a package fills its table. This module imports nothing of mlic but :mod:`mlic.errors`,
so any module may import it without a cycle (timm's ``_registry.py``). The ``get_*`` and ``list_*``
helpers import the member package first, so they work from a fresh interpreter too.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from mlic.errors import MlicError

LOSSES: dict[str, Callable[..., Any]] = {}
"""Loss classes (``nn.Module``) by name, built as ``LOSSES[name](**loss_args)``; members in mlic/losses/."""

HEADS: dict[str, Callable[..., Any]] = {}
"""Heads by name, built as ``HEADS[name](in_channels, num_classes, **head_args)``; members in mlic/models/."""

BACKBONES: dict[str, Callable[..., Any]] = {}
"""In-house backbones by name (timm's own are found through timm), built as ``BACKBONES[name](pretrained=...)``."""

READERS: dict[str, Callable[..., Any]] = {}
"""Data-set readers by kind: ``READERS[kind](root, **options) -> {split: LabelSet}``; members in mlic/data/."""


def registrar(table: dict, kind: str) -> Callable[[str], Callable]:
    """A decorator factory adding entries to ``table`` under a name; a name registered twice is refused.

    Example:
        >>> HEADS = {}
        >>> register_head = registrar(HEADS, "head")
        >>> @register_head("linear")
        ... class LinearHead: ...
    """

    def register(name: str) -> Callable:
        def add(obj):
            if name in table:
                raise MlicError(f"{kind} '{name}' is registered twice")
            table[name] = obj
            return obj

        return add

    return register


register_loss = registrar(LOSSES, "loss")
"""Class decorator adding a loss under a name; a name registered twice is refused."""

register_head = registrar(HEADS, "head")
"""Class decorator adding a head under a name; a name registered twice is refused."""

register_backbone = registrar(BACKBONES, "backbone")
"""Decorator adding a backbone (class or function) under a name; a name registered twice is refused."""

register_reader = registrar(READERS, "reader")
"""Function decorator adding a data-set reader under a kind name; a name registered twice is refused."""


def _members(package: str) -> None:
    importlib.import_module(package)  # its __init__ imports the modules that register


def _get(table: dict, kind: str, name: str, package: str) -> Callable[..., Any]:
    names = _names(table, package)
    if name not in table:
        raise MlicError(f"unknown {kind} '{name}'; choose one of: {', '.join(names)}")
    return table[name]


def get_loss(name: str) -> Callable[..., Any]:
    """The loss class registered under ``name`` (exact name; ``mlic.losses.build_loss`` builds one)."""
    return _get(LOSSES, "loss", name, "mlic.losses")


def get_head(name: str) -> Callable[..., Any]:
    """The head registered under ``name``."""
    return _get(HEADS, "head", name, "mlic.models")


def get_backbone(name: str) -> Callable[..., Any]:
    """The in-house backbone registered under ``name`` (timm's own are built by ``mlic.models.backbones``)."""
    return _get(BACKBONES, "backbone", name, "mlic.models")


def get_reader(kind: str) -> Callable[..., Any]:
    """The data-set reader registered under ``kind`` ("coco", "voc", ...)."""
    return _get(READERS, "data set kind", kind, "mlic.data")


def _names(table: dict, package: str) -> list[str]:
    _members(package)
    return sorted(table)


def list_losses() -> list[str]:
    """Every registered loss name, sorted."""
    return _names(LOSSES, "mlic.losses")


def list_heads() -> list[str]:
    """Every registered head name, sorted."""
    return _names(HEADS, "mlic.models")


def list_backbones() -> list[str]:
    """Every in-house backbone name, sorted (timm's models are not listed)."""
    return _names(BACKBONES, "mlic.models")


def list_readers() -> list[str]:
    """Every registered data-set kind, sorted."""
    return _names(READERS, "mlic.data")


def accepted_arguments(factory: Callable, skip: int = 0) -> list[str] | None:
    """The keyword arguments ``factory`` (a class or function) takes after its first ``skip`` parameters;
    None when it takes ``**kwargs`` (anything)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = list(inspect.signature(target).parameters.values())[(1 if inspect.isclass(factory) else 0) + skip:]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_arguments(factory: Callable, kwargs: dict, what: str, option: str, skip: int = 0) -> None:
    """Refuse keys of ``kwargs`` that ``factory`` does not take, with one line listing the valid ones.

    Args:
        factory: the class or function the arguments are for.
        kwargs: the arguments a user gave.
        what: what is being built, e.g. "head 'query2label'".
        option: the option that carried them, e.g. "--head-arg".
        skip: leading parameters filled by mlic itself (e.g. in_channels, num_classes).
    """
    valid = accepted_arguments(factory, skip)
    unknown = [] if valid is None else sorted(set(kwargs) - set(valid))
    if unknown:
        raise MlicError(f"{option} {', '.join(unknown)}: not a setting of {what}; valid keys: "
                         f"{', '.join(valid) or 'none'}")
