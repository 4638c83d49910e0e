"""Teachers: frozen models that score every class of an image, and the rules that turn scores into pseudo-labels.

::

    from mlic.teachers import build_teacher, pseudo_labels
    teacher = build_teacher("clip", weights=W, class_names=names, prompt="a photo of a {}.")  # or text_features=
    sims = teacher(x)                                  # (B, 3, S, S) preprocessed -> (B, K) float32 cosines
    pl = pseudo_labels("vlpl" | "aevlp", sims, observed, **rule_args)   # (B, K) int8: 1 / -1 / 0

A teacher is any frozen ``nn.Module`` mapping preprocessed images to (B, K) class scores, with ``image_size``
(its input side) and ``num_classes``; ``"clip"`` is CLIP (clip.py), ``"classifier"`` wraps an mlic model
(classifier.py: e.g. a stand-in teacher on MultiDigits). View makers (the teacher's input) are in views.py.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mlic.errors import MlicError
from mlic.registry import check_arguments, registrar
from mlic.teachers.clip import ClipTeacher, TeacherError
from mlic.teachers.rules import RULES, aevlp_pseudo_labels, pseudo_labels, vlpl_pseudo_labels

TEACHERS: dict[str, Callable[..., nn.Module]] = {}

register_teacher = registrar(TEACHERS, "teacher")
"""Class decorator adding a teacher under a name; a name registered twice is refused."""

register_teacher("clip")(ClipTeacher)


def build_teacher(name: str, **kwargs) -> nn.Module:
    """The frozen teacher registered under ``name`` ("clip", "classifier"), in eval mode, without gradients."""
    key = name.lower().replace("-", "_")
    if key not in TEACHERS:
        raise MlicError(f"unknown teacher '{name}'; choose one of: {', '.join(sorted(TEACHERS))}")
    check_arguments(TEACHERS[key], kwargs, f"teacher '{key}'", "--teacher-arg")
    teacher = TEACHERS[key](**kwargs)
    teacher.requires_grad_(False)
    return teacher.eval()


from mlic.teachers import classifier  # noqa: E402,F401  (registers "classifier")

__all__ = ["RULES", "TEACHERS", "ClipTeacher", "TeacherError", "aevlp_pseudo_labels", "build_teacher",
           "pseudo_labels", "register_teacher", "vlpl_pseudo_labels"]
