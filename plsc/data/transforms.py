"""Image preprocessing: a decoded BGR uint8 image -> a normalised float32 array in the model's layout.

The steps follow PLSC: resize to the square training size when needed, random horizontal flip (training only),
BGR -> RGB, ``(x / 255 - 0.5) / 0.5``, then CHW for NCHW models or HWC for NHWC models. The layout is produced
here so that nothing downstream has to transpose a batch.

Training splits this in two: the loader's workers stop at the uint8 pixels in the model's layout, written
straight into their slot of the batch (:meth:`TrainTransform.write_pixels`: flip, BGR -> RGB and layout in
one OpenCV pass; :class:`TrainBatches` writes a whole batch), and the training step normalises the whole batch
as a tensor (:func:`normalize_batch`).
A worker then neither computes nor hands over float32 (a quarter of the bytes through shared memory), and the
result is bit-identical to normalising here.

Randomness is never drawn from global or per-worker state: each sample's flip is a hash of (seed, epoch,
sample index) (:func:`flip_draws`), so a batch is the same whichever loader worker built it, whatever the
number of workers or ranks.
"""

from __future__ import annotations

import cv2
import numpy as np

from plsc.errors import PlscError

DATA_FORMATS = ("NCHW", "NHWC")


# SplitMix64's increment and finaliser constants (Steele, Lea & Flood, 2014): a bijective 64-bit mix whose
# every output bit depends on every input bit.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix64(values: np.ndarray) -> np.ndarray:
    values = values ^ (values >> np.uint64(30))
    values = values * _MIX[0]
    values = values ^ (values >> np.uint64(27))
    values = values * _MIX[1]
    return values ^ (values >> np.uint64(31))


def flip_draws(seed: int, epoch: int, indices) -> np.ndarray:
    """Whether each sample of ``indices`` is mirrored in ``epoch``: a fair coin per (seed, epoch, index).

    A keyed hash, vectorised over the batch, instead of a generator per sample: seeding a numpy Generator
    costs ~17-28 us, as much as a fifth of decoding the image. The draw depends on nothing else, so it is
    the same in any worker, batch or rank.
    """
    # Arrays throughout: numpy wraps uint64 array arithmetic modulo 2^64 silently (scalars would warn).
    key = _mix64(np.asarray([int(seed) % 2**64], dtype=np.uint64) + _GAMMA)
    key = _mix64(key ^ (np.asarray([int(epoch) % 2**64], dtype=np.uint64) * _GAMMA))
    draws = _mix64(key + np.asarray(indices, dtype=np.uint64).reshape(-1) * _GAMMA)
    return (draws >> np.uint64(63)).astype(bool)


def check_data_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise PlscError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    return data_format


def check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise PlscError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


# (x / 255 - 0.5) / 0.5 == x * PIXEL_SCALE - 1
PIXEL_SCALE = np.float32(1.0 / 127.5)


def _opencv_writes_into_given_arrays() -> bool:
    """Whether this OpenCV's cvtColor and split fill the arrays they are given (rather than allocating new
    ones): probed once, so that the per-image path needs no check."""
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    converted, planes = np.empty_like(image), np.empty((3, 2, 2), dtype=np.uint8)
    cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=converted)
    cv2.split(image, list(planes))
    return np.array_equal(converted, image[..., ::-1]) and np.array_equal(planes, image.transpose(2, 0, 1))


_WRITES_IN_PLACE = _opencv_writes_into_given_arrays()


def normalize_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 ``x * PIXEL_SCALE - 1`` in [-1, 1]."""
    values = pixels.astype(np.float32)
    values *= PIXEL_SCALE  # in place: no more temporaries per image
    values -= np.float32(1.0)
    return values


class EvalTransform:
    """Deterministic preprocessing (no augmentation): resize, BGR->RGB, normalise, layout."""

    flip = False  # TrainTransform's: whether a sample's flip draw mirrors it

    def __init__(self, image_size: int, data_format: str = "NCHW"):
        self.image_size = check_image_size(image_size)
        self.data_format = check_data_format(data_format)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        size = self.image_size
        return (3, size, size) if self.data_format == "NCHW" else (size, size, 3)

    def __call__(self, image: np.ndarray, flip: bool = False) -> np.ndarray:
        return normalize_pixels(self.pixels(image, flip))

    def pixels(self, image: np.ndarray, flip: bool = False) -> np.ndarray:
        """The transform up to normalisation: uint8 RGB pixels in the model's layout (what workers send)."""
        out = np.empty(self.pixel_shape, dtype=np.uint8)
        self.write_pixels(out, image, flip)
        return out

    def write_pixels(self, out: np.ndarray, image: np.ndarray, flip: bool = False) -> None:
        """:meth:`pixels` written into ``out`` (a slot of the batch): BGR uint8 HxWx3 resized to the square
        size, mirrored when ``flip`` and the transform flips, RGB into ``out`` as [3, H, W] (NCHW) or
        [H, W, 3]."""
        is_bgr = isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
        if not is_bgr or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise PlscError(f"expected a uint8 HxWx3 BGR image, got shape {shape} dtype {dtype}")
        size = self.image_size
        height, width = image.shape[:2]
        if height != size or width != size:  # INTER_AREA when shrinking (no aliasing), INTER_LINEAR enlarging
            interpolation = cv2.INTER_AREA if height * width > size * size else cv2.INTER_LINEAR
            image = cv2.resize(image, (size, size), interpolation=interpolation)
        if self.flip and flip:
            image = cv2.flip(image, 1)
        # OpenCV's SIMD loops: 7 us per 112 x 112 image into a batch slot, against 20 us for numpy's strided
        # copy.
        if self.data_format == "NHWC":
            rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=out)
            if not _WRITES_IN_PLACE:
                out[...] = rgb
            return
        planes = cv2.split(image, [out[2], out[1], out[0]])  # B, G, R straight into the R, G, B slots
        if not _WRITES_IN_PLACE:
            out[2], out[1], out[0] = planes


class TrainTransform(EvalTransform):
    """EvalTransform plus a horizontal flip where the caller's draw says so (see :func:`flip_draws`)."""

    def __init__(self, image_size: int, data_format: str = "NCHW", flip: bool = True):
        super().__init__(image_size, data_format)
        self.flip = bool(flip)


# --- a whole batch ---

DECODE_GROUP = 16  # images decoded back to back before they are written into the batch (TrainBatches.fill)


class TrainBatches:
    """A dataset under the training transform, up to normalisation, a whole batch per item: the key
    (epoch, indices) gives (uint8 pixels [B, ...] in the model's layout, int64 labels [B]). The loader's
    workers (plsc.data.workers) or, without workers, :meth:`in_process` build the batches."""

    def __init__(self, dataset, transform: TrainTransform, seed: int):
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((len(key[1]), *self.transform.pixel_shape), dtype=np.uint8)
        return images, self.fill(key, images)

    def fill(self, key: tuple[int, list[int]], images: np.ndarray) -> np.ndarray:
        """Write the batch's pixels into ``images`` ([B, ...] uint8, e.g. a shared-memory slot); returns
        its labels."""
        epoch, indices = key
        labels = np.empty(len(indices), dtype=np.int64)
        flips = flip_draws(self.seed, epoch, indices).tolist()
        dataset, write_pixels = self.dataset, self.transform.write_pixels  # ~100 us per image: no lookups
        # Decoded a group at a time, then written: back-to-back decodes keep the decoder's code and tables
        # in cache (~2% per image), and a group's decoded images (16 x 37 KB at 112 px) still fit in L2.
        for start in range(0, len(indices), DECODE_GROUP):
            group = [dataset[index] for index in indices[start : start + DECODE_GROUP]]
            for slot, (image, labels[slot]) in enumerate(group, start):
                write_pixels(images[slot], image, flips[slot])
        return labels

    def in_process(self, keys, batch_size: int):
        """The batches of ``keys`` as ``(images, labels)`` tensors, built one after the other in this process
        (a loader without workers) in one array reused from batch to batch (the tensors are copies)."""
        import paddle  # see normalize_batch

        images = np.empty((batch_size, *self.transform.pixel_shape), dtype=np.uint8)
        for key in keys:
            labels = self.fill(key, images)
            yield paddle.to_tensor(images), paddle.to_tensor(labels)


def normalize_batch(pixels):
    """A loader batch (uint8 pixels, a Paddle tensor) -> the model's float32 input in [-1, 1], on the training
    device; the same values as :func:`normalize_pixels` (two roundings, as numpy makes them).

    A batch lent by the loader's workers is host memory (plsc.data.workers); on an accelerator it is copied
    to the device first, the one copy a batch needs there.
    """
    # Imported here, not with the module: importing a data set module stays cheap (plsc.data).
    import paddle

    device = paddle.device.get_device()
    if device != "cpu" and pixels.place.is_cpu_place():
        pixels = paddle.to_tensor(pixels, place=device)
    return pixels.astype("float32") * float(PIXEL_SCALE) - 1.0
