"""View makers: what a teacher sees of an image.

- ``"vlpl"`` (VLPL's official input): the student's own ImageNet-normalised tensor, bilinear-antialias resized
  to the teacher's side (336): :func:`resize_view`.
- ``"aevlp"`` (AEVLP's official input): a global view plus a g×g grid of tiles cut from the raw image (the right
  and bottom remainders in no tile), each squashed to 224 with PIL's bilinear resize, optionally flipped (one
  draw per view), ImageNet-normalised: :func:`grid_views`. View 0 is the global view, tiles row-major.
- ``"clip"`` (CLIP's own preprocessing, the fixed choice): bicubic short-side resize, centre crop, CLIP
  mean/std: :func:`clip_view`.

Every maker returns float32 tensors ready for the teacher: (3, S, S), or (V, 3, S, S) for grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mlic.errors import MlicError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEACHER_INPUTS = ("vlpl", "aevlp", "clip")


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0, 1] float images (..., 3, H, W) -> float32 (x - mean) / std, as ToTensor + Normalize."""
    if x.dtype == torch.uint8:
        x = x.float().div(255)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - m) / s


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return TF.to_pil_image(torch.as_tensor(image))


def resize_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """VLPL: the student's normalised batch (B, 3, H, W) -> (B, 3, size, size), bilinear, antialiased."""
    return F.interpolate(x.float(), (size, size), mode="bilinear", align_corners=False, antialias=True)


def tile_boxes(width: int, height: int, grid: int) -> list[tuple[int, int, int, int]]:
    """AEVLP's tiles (left, top, right, bottom), row-major; the last ``W % g`` columns / ``H % g`` rows in none."""
    tw, th = width // grid, height // grid
    return [(x * tw, y * th, min(width, (x + 1) * tw), min(height, (y + 1) * th))
            for y in range(grid) for x in range(grid)]


def grid_views(image, grid: int = 4, size: int = 224, flip: bool = False, generator: torch.Generator | None = None,
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """AEVLP's views of one raw image: (g² + 1, 3, size, size) float32, view 0 the whole image.

    Args:
        image: PIL image or uint8 tensor (3, H, W), at its native size.
        grid: g (official 4; CUB 5).
        flip: a horizontal flip with probability ½ per view (official: True, re-drawn every epoch).
        generator: the flips' random generator.
    """
    if grid < 1:
        raise MlicError(f"grid_size {grid}: choose 1 or more tiles per side")
    img = _pil(image)
    boxes = [(0, 0, *img.size)] + tile_boxes(*img.size, grid)
    views = []
    for box in boxes:
        view = TF.pil_to_tensor(img.crop(box).resize((size, size), Image.BILINEAR))
        if flip and torch.rand((), generator=generator) < 0.5:
            view = view.flip(-1)
        views.append(view)
    return _normalize(torch.stack(views), mean, std)


def clip_view(image, size: int = 224) -> torch.Tensor:
    """CLIP's preprocessing of one image: bicubic short-side resize, centre crop, CLIP mean/std: (3, size, size)."""
    img = _pil(image)
    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
    return _normalize(TF.pil_to_tensor(TF.center_crop(img, size)), CLIP_MEAN, CLIP_STD)


def student_view(image, student_size: int, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """VLPL's view of a raw image without the student's flip: squash to the student's side, normalise, resize."""
    img = _pil(image).resize((student_size, student_size), Image.BILINEAR)
    x = _normalize(TF.pil_to_tensor(img), mean, std)
    return resize_view(x[None], size)[0]


def make_views(kind: str, image, size: int, student_size: int | None = None, grid: int = 4, flip: bool = False,
               generator: torch.Generator | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """The teacher's input of one raw image for ``kind`` (:data:`TEACHER_INPUTS`): (V, 3, size, size) float32."""
    if kind == "aevlp":
        return grid_views(image, grid, size, flip, generator, mean, std)
    if kind == "clip":
        return clip_view(image, size)[None]
    if kind == "vlpl":
        return student_view(image, student_size or size, size, mean, std)[None]
    raise MlicError(f"teacher_input {kind!r}: choose one of {', '.join(TEACHER_INPUTS)}")
