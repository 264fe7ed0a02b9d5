"""Image preprocessing: a decoded BGR uint8 image -> a normalised float32 array in the model's layout.

The steps follow PLSC: resize to the square training size when needed, random horizontal flip (training only),
BGR -> RGB, ``(x / 255 - 0.5) / 0.5``, then CHW for NCHW models or HWC for NHWC models. The layout is produced
here so that nothing downstream has to transpose a batch.

Training splits this in two: the loader's workers stop at the uint8 pixels in the model's layout
(:meth:`TrainTransform.pixels`; flip, BGR -> RGB and layout are one strided copy), and the trainer normalises
the whole batch as a tensor (plsc.data.loader.normalize_batch). A worker then neither computes nor hands over
float32 (a quarter of the bytes through shared memory), and the result is bit-identical to normalising here.

Randomness is never drawn from global or per-worker state: the caller passes a ``numpy.random.Generator``,
normally from :func:`sample_rng`, which is seeded by (seed, epoch, sample index). A batch is therefore the
same whichever DataLoader worker built it, and whatever the number of workers.
"""

from __future__ import annotations

import cv2
import numpy as np

from plsc.errors import PlscError

DATA_FORMATS = ("NCHW", "NHWC")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation in one epoch; independent streams for distinct triples."""
    return np.random.default_rng((int(seed), int(epoch), int(index)))


def check_data_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise PlscError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    return data_format


def check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise PlscError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def resize_square(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize to image_size squared: INTER_AREA when shrinking (no aliasing), INTER_LINEAR when enlarging."""
    height, width = image.shape[:2]
    if height == image_size and width == image_size:
        return image
    shrinking = height * width > image_size * image_size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (image_size, image_size), interpolation=interpolation)


# (x / 255 - 0.5) / 0.5 == x * PIXEL_SCALE - 1
PIXEL_SCALE = np.float32(1.0 / 127.5)


def pixels_in_layout(image_bgr: np.ndarray, data_format: str, flip: bool = False) -> np.ndarray:
    """BGR uint8 HWC -> RGB uint8, optionally mirrored, contiguous CHW (NCHW) or HWC (NHWC): one copy."""
    rgb = image_bgr[:, ::-1, ::-1] if flip else image_bgr[:, :, ::-1]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1) if data_format == "NCHW" else rgb)


def normalize_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 ``x * PIXEL_SCALE - 1`` in [-1, 1]."""
    values = pixels.astype(np.float32)
    values *= PIXEL_SCALE  # in place: no more temporaries per image
    values -= np.float32(1.0)
    return values


def normalize_to_layout(image_bgr: np.ndarray, data_format: str) -> np.ndarray:
    """BGR uint8 HWC -> RGB float32 in [-1, 1], contiguous CHW (NCHW) or HWC (NHWC)."""
    return normalize_pixels(pixels_in_layout(image_bgr, data_format))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise PlscError(f"expected a uint8 HxWx3 BGR image, got shape {shape} dtype {dtype}")


class EvalTransform:
    """Deterministic preprocessing (no augmentation): resize, BGR->RGB, normalise, layout."""

    def __init__(self, image_size: int, data_format: str = "NCHW"):
        self.image_size = check_image_size(image_size)
        self.data_format = check_data_format(data_format)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        _check_image(image)
        return normalize_to_layout(resize_square(image, self.image_size), self.data_format)


class TrainTransform(EvalTransform):
    """EvalTransform plus a random horizontal flip (probability 0.5) drawn from the generator passed in."""

    def __init__(self, image_size: int, data_format: str = "NCHW", flip: bool = True):
        super().__init__(image_size, data_format)
        self.flip = bool(flip)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return normalize_pixels(self.pixels(image, rng))

    def pixels(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The transform up to normalisation: uint8 RGB pixels in the model's layout (what workers send)."""
        _check_image(image)
        image = resize_square(image, self.image_size)
        flip = False
        if self.flip:
            if rng is None:
                # no silent fallback to global randomness: it would make runs irreproducible
                raise PlscError("TrainTransform with flip=True needs a numpy Generator, e.g. sample_rng(...)")
            flip = rng.random() < 0.5
        return pixels_in_layout(image, self.data_format, flip)
