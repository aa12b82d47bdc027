"""Image augmentation (data.image_augment): off = bit-identical, on = changed, seeded, ranges held."""
import io

import numpy as np
from PIL import Image

from mmpretrain.config import ImageAugmentConfig
from mmpretrain.data import image_augment
from mmpretrain.data.decode import CLIP_MEAN, decode_image, pixel_affine

SIZE = 32


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pattern() -> bytes:
    """A textured colour image (gradients + a bright square), so every step has something to change."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    arr = np.stack([x * 6, y * 6, (x + y) * 3], -1) % 256
    arr[8:16, 8:16] = 255
    return _png(arr)


def _rng(i: int = 0) -> np.random.Generator:
    return np.random.default_rng([11, i])


def _decode(data: bytes, i: int = 0, **kw) -> np.ndarray:
    aug = ImageAugmentConfig(**kw) if kw else None
    return decode_image(data, SIZE, _rng(i), min_scale=1.0, augment=aug)


def _pixels(x: np.ndarray) -> np.ndarray:
    return x.transpose(1, 2, 0) / 255.0  # 8-bit levels, channel-first -> 0..1 RGB


def _model_input(x: np.ndarray) -> np.ndarray:
    """decode_image's levels as the model sees them (CLIP's normalisation: pixel_affine)."""
    scale, shift = pixel_affine()
    return x * np.asarray(scale)[:, None, None] + np.asarray(shift)[:, None, None]


MEAN_LEVELS = np.round(CLIP_MEAN * 255).astype(np.uint8)[:, None, None]


STEPS = [dict(rotate_deg=20.0), dict(scale=[0.8, 1.2]), dict(shear_deg=10.0), dict(translate=0.1),
         dict(brightness=0.4), dict(contrast=0.4), dict(saturation=0.4), dict(blur_prob=1.0),
         dict(erase_prob=1.0)]


def test_off_is_bit_identical():
    data = _pattern()
    a, b = _rng(), _rng()
    ref = decode_image(data, SIZE, a, min_scale=0.8)
    out = decode_image(data, SIZE, b, min_scale=0.8, augment=ImageAugmentConfig())
    assert np.array_equal(ref, out) and a.random() == b.random()  # no extra draws either
    on = ImageAugmentConfig(rotate_deg=30, erase_prob=1.0)
    assert np.array_equal(decode_image(data, SIZE, None), decode_image(data, SIZE, None, augment=on))  # eval


def test_each_step_changes_the_image_and_is_seeded():
    data = _pattern()
    ref = _decode(data)
    for kw in STEPS:
        out = _decode(data, 0, **kw)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == np.uint8
        assert not np.array_equal(out, ref), kw
        assert np.array_equal(out, _decode(data, 0, **kw)), kw  # same seed, same image
        assert any(not np.array_equal(out, _decode(data, i, **kw)) for i in range(1, 4)), kw  # draws differ


def test_rotation_matches_the_drawn_angle_range():
    # a horizontal bar through the centre: its principal axis turns by the drawn angle, within +-15 deg
    arr = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    arr[15:17, 4:28] = 255
    data = _png(arr)
    angles = []
    for i in range(12):
        lum = _pixels(_decode(data, i, rotate_deg=15.0)).mean(-1)
        ys, xs = np.nonzero(lum > 0.7)
        cov = np.cov(np.stack([xs, -ys]).astype(np.float64))
        w, v = np.linalg.eigh(cov)
        ax = v[:, -1]
        ang = np.degrees(np.arctan2(ax[1], ax[0]))
        angles.append((ang + 90) % 180 - 90)
    assert max(abs(a) for a in angles) <= 15.0 + 3.0 and max(angles) - min(angles) > 8.0


def test_brightness_factor_within_range():
    grey = _png(np.full((SIZE, SIZE, 3), 100, dtype=np.uint8))
    means = [_pixels(_decode(grey, i, brightness=0.3)).mean() * 255 for i in range(20)]
    assert min(means) >= 100 * 0.7 - 1 and max(means) <= 100 * 1.3 + 1 and max(means) - min(means) > 15


def test_erasing_area_and_fill():
    data = _pattern()
    ref = _decode(data)
    for i in range(10):
        out = _decode(data, i, erase_prob=1.0, erase_area=[0.1, 0.2])
        erased = np.all(out == MEAN_LEVELS, axis=0) & ~np.all(ref == MEAN_LEVELS, axis=0)  # the mean's levels
        share = erased.sum() / SIZE ** 2
        assert 0.1 * 0.6 <= share <= 0.2 * 1.4, share  # integer rounding of the rectangle's sides
        # the rest untouched: erasing draws after the pixel steps, here the only step
        assert np.array_equal(out[:, ~erased], ref[:, ~erased])


def test_affine_fill_is_the_mean():
    data = _png(np.full((SIZE, SIZE, 3), 255, dtype=np.uint8))
    out = _decode(data, 0, scale=[0.5, 0.5])  # zoomed out: the border shows the fill
    x = _model_input(out)  # the mean's levels read as ~0 by the model
    assert np.abs(x[:, 0, 0]).max() < 0.02 and np.abs(x[:, SIZE // 2, SIZE // 2] - x.max(axis=(1, 2))).max() < 1e-6


def test_matrix_rotates_counter_clockwise():
    m = image_augment.affine_matrix((10, 10), 90.0, 1.0, 0.0, (0.0, 0.0))
    x, y, _ = m @ np.array([10.0, 5.0, 1.0])  # the right edge's middle goes to the top (y down on screen)
    assert abs(x - 5) < 1e-9 and abs(y - 0) < 1e-9
