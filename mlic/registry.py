"""The one tiny registry helper behind backbones, heads and losses: a plain dict and a decorator."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from mlic.errors import MlicError


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
