"""Training-only image augmentation (data.image_augment), PIL and numpy only: small random
affine, colour jitter and Gaussian blur on the cropped PIL image, random erasing on the
8-bit array. A switched-off step draws nothing from the sample's rng, so a config with
everything off gives bit-identical images."""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def active(aug: Any) -> bool:
    """Whether any step of `aug` (an ImageAugmentConfig or None) changes an image."""
    return aug is not None and (_affine_on(aug) or aug.brightness > 0 or aug.contrast > 0 or aug.saturation > 0
                                or aug.blur_prob > 0 or aug.erase_prob > 0)


def _affine_on(aug: Any) -> bool:
    return aug.rotate_deg > 0 or list(aug.scale) != [1.0, 1.0] or aug.shear_deg > 0 or aug.translate > 0


def affine_matrix(size: Tuple[int, int], angle: float, scale: float, shear: float,
                  shift: Tuple[float, float]) -> np.ndarray:
    """(3, 3) forward map of output pixel centres: about the image centre, zoom, then shear along
    x, then rotate by `angle` degrees (counter-clockwise on screen), then shift by `shift` pixels."""
    cx, cy = size[0] / 2.0, size[1] / 2.0
    a, s = math.radians(angle), math.tan(math.radians(shear))
    centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
    zoom = np.diag([scale, scale, 1.0])
    sh = np.array([[1, s, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    # y points down on screen: this matrix turns the picture counter-clockwise for angle > 0
    rot = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=np.float64)
    back = np.array([[1, 0, cx + shift[0]], [0, 1, cy + shift[1]], [0, 0, 1]], dtype=np.float64)
    return back @ rot @ sh @ zoom @ centre


def fill_levels(fill: Sequence[float]) -> Tuple[int, ...]:
    """The 8-bit level nearest each channel of `fill` (0..1): what affine borders and erased
    rectangles are painted with."""
    return tuple(int(round(255 * f)) for f in fill)


def augment_pil(img: Image.Image, aug: Any, rng: np.random.Generator, fill: Sequence[float]) -> Image.Image:
    """Affine (outside filled with `fill`, 0..1 per channel), colour jitter, blur."""
    if _affine_on(aug):
        angle = rng.uniform(-aug.rotate_deg, aug.rotate_deg) if aug.rotate_deg > 0 else 0.0
        scale = rng.uniform(float(aug.scale[0]), float(aug.scale[1])) if list(aug.scale) != [1.0, 1.0] else 1.0
        shear = rng.uniform(-aug.shear_deg, aug.shear_deg) if aug.shear_deg > 0 else 0.0
        t = aug.translate
        shift = (rng.uniform(-t, t) * img.size[0], rng.uniform(-t, t) * img.size[1]) if t > 0 else (0.0, 0.0)
        inv = np.linalg.inv(affine_matrix(img.size, angle, scale, shear, shift))  # PIL maps output -> input
        img = img.transform(img.size, Image.AFFINE, data=tuple(inv[:2].reshape(-1)), resample=Image.BILINEAR,
                            fillcolor=fill_levels(fill))
    for amount, enhancer in ((aug.brightness, ImageEnhance.Brightness), (aug.contrast, ImageEnhance.Contrast),
                             (aug.saturation, ImageEnhance.Color)):
        if amount > 0:
            img = enhancer(img).enhance(float(rng.uniform(1.0 - amount, 1.0 + amount)))
    if aug.blur_prob > 0:
        u, radius = rng.random(), rng.uniform(float(aug.blur_radius[0]), float(aug.blur_radius[1]))
        if u < aug.blur_prob:
            img = img.filter(ImageFilter.GaussianBlur(radius))
    return img


def erase(x: np.ndarray, aug: Any, rng: np.random.Generator, fill: Sequence[float]) -> None:
    """Random erasing in place on a uint8 (C, H, W) array: one rectangle of an area share from
    aug.erase_area and aspect in [0.3, 3.3], filled with the level nearest `fill` (0..1 per channel:
    the normalisation mean, so the model sees ~0 there)."""
    if aug.erase_prob <= 0:
        return
    _, h, w = x.shape
    u, area = rng.random(), rng.uniform(float(aug.erase_area[0]), float(aug.erase_area[1]))
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    eh = min(h, max(1, int(round(math.sqrt(area * h * w / aspect)))))
    ew = min(w, max(1, int(round(math.sqrt(area * h * w * aspect)))))
    y0, x0 = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    if u < aug.erase_prob and area > 0:
        x[:, y0:y0 + eh, x0:x0 + ew] = np.asarray(fill_levels(fill), dtype=x.dtype)[:, None, None]
