"""Training batches: seeded distributed shuffle, per-sample deterministic augmentation, worker processes.

Reproducibility: the sampler's permutation depends only on (seed, epoch), and each sample's flip only on
(seed, epoch, index); the epoch travels with every batch to the workers. No worker-local random state is used,
so the same seed gives the same batches with 0, 2 or 8 workers.

A worker builds a whole batch per request (TrainBatches): each image is decoded and written straight into its
slot of a shared batch array (plsc.data.workers), so there is no per-sample hand-over, no list of samples and
no stacking copy.
Batches are uint8 pixels in the model's layout (plsc.data.transforms.TrainBatches); the training step
normalises them on its device (plsc.data.transforms.normalize_batch).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from plsc.data.folder import FolderDataset, count_label_lines
from plsc.data.synthetic import SyntheticDataset
from plsc.data.transforms import TrainBatches, TrainTransform, check_data_format, check_image_size
from plsc.data.workers import TrainLoader
from plsc.errors import PlscError

log = logging.getLogger("plsc.data")

# --- sampler ---


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlscError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class DistributedShuffleSampler:
    """Yields this rank's batches (lists of sample indices) for one epoch.

    Every rank draws the same permutation from (seed, epoch). Global step ``g`` takes the contiguous slice
    ``perm[g*world*B : (g+1)*world*B]`` and rank ``r`` gets its ``r``-th block of ``B``, so the ranks'
    shares are disjoint and one global step sees the same samples as one process with batch ``world*B``.
    drop_last=True drops the ``N mod (world*B)`` leftover samples of the permutation (different ones each
    epoch), so every rank has the same number of full batches; drop_last=False instead pads the permutation
    by wrapping around, so no sample is dropped and every batch is still full.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ):
        self.num_samples = _check_positive("num_samples", num_samples)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.world_size = _check_positive("world_size", world_size)
        if not 0 <= rank < self.world_size:
            raise PlscError(f"rank must be in [0, {self.world_size}), got {rank}")
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0
        if self.batches_per_epoch == 0:
            raise PlscError(
                f"{self.num_samples} samples are fewer than one global batch of {self.global_batch_size} "
                f"({self.world_size} ranks x batch {self.batch_size}); lower the batch size"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation; start_batch > 0 resumes mid-epoch (e.g. from a step checkpoint)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise PlscError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def rank_batches(self) -> np.ndarray:
        """This rank's indices for the whole current epoch, shape [batches_per_epoch, batch_size], int64."""
        permutation = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)
        used = self.batches_per_epoch * self.global_batch_size
        # drop_last takes the first ``used`` (a view: no second N-sized array at start-up); padding repeats
        # from the start, in permutation order
        used_order = permutation[:used] if used <= self.num_samples else np.resize(permutation, used)
        steps = used_order.reshape(self.batches_per_epoch, self.world_size, self.batch_size)
        return steps[:, self.rank, :].astype(np.int64)

    def __iter__(self):
        for batch in self.rank_batches()[self.start_batch :]:
            yield batch.tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def build_train_loader(
    dataset,
    *,
    batch_size: int,
    image_size: int,
    data_format: str = "NCHW",
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    flip: bool = True,
    drop_last: bool = True,
) -> tuple[TrainLoader, DistributedShuffleSampler]:
    """A loader yielding (images, labels): uint8 [B,3,S,S] (NCHW) or [B,S,S,3] (NHWC) RGB pixels, int64
    [B]; ``normalize_batch(images)`` is the model's input.

    Call ``sampler.set_epoch(epoch)`` before iterating the loader for each epoch.
    """
    image_size = check_image_size(image_size)
    check_data_format(data_format)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise PlscError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    sampler = DistributedShuffleSampler(len(dataset), batch_size, rank, world_size, seed, drop_last)
    batches = TrainBatches(dataset, TrainTransform(image_size, data_format, flip=flip), seed)
    return TrainLoader(batches, sampler, num_workers), sampler


def build_train_loader_from_config(config, dataset, rank: int = 0, world_size: int = 1):
    """build_train_loader with the settings of a plsc.config.Config (train, data and model sections)."""
    return build_train_loader(
        dataset,
        batch_size=config.train.batch_size,
        image_size=config.data.image_size,
        data_format=config.model.data_format,
        num_workers=config.data.num_workers,
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
    )


# --- data sets from the configuration ---


def _build_record_dataset(data_cfg):
    from plsc.data.recordio import RecordDataset  # written separately; only needed for source=rec

    rec_path = Path(data_cfg.root) / data_cfg.rec_file
    idx_path = rec_path.with_suffix(".idx")
    return RecordDataset(str(rec_path), str(idx_path) if idx_path.is_file() else None)


def _build_synthetic_dataset(data_cfg, seed: int) -> SyntheticDataset:
    if data_cfg.num_classes < 1:
        raise PlscError("data.num_classes must be set (> 0) for data.source=synthetic")
    return SyntheticDataset(data_cfg.synthetic_samples, data_cfg.num_classes, data_cfg.image_size, seed)


def count_samples(data_cfg) -> tuple[int, str]:
    """The training samples a plsc.config.DataConfig describes, counted without reading an image or a label
    (the size :func:`build_dataset` gives in strict mode), and where the count was read."""
    if data_cfg.source == "folder":
        return count_label_lines(data_cfg.root, data_cfg.label_file), "label file"
    if data_cfg.source == "rec":
        from plsc.data.recordio import count_record_images

        return count_record_images(Path(data_cfg.root) / data_cfg.rec_file), ".rec index"
    if data_cfg.source == "synthetic":
        return data_cfg.synthetic_samples, "data.synthetic_samples"
    raise PlscError(f"data.source must be folder, rec or synthetic, got {data_cfg.source!r}")


_LABEL_SLICE = 1 << 20


def count_distinct(labels: np.ndarray, largest: int) -> int:
    """How many distinct values the non-negative ``labels`` (largest ``largest``) hold: marks in one byte per
    class, a slice of labels at a time (42M labels: a fraction of a second and no copy, against seconds and
    a sorted copy for np.unique); sorted where classes outnumber the labels."""
    if largest >= len(labels):
        return len(np.unique(labels))
    seen = np.zeros(largest + 1, dtype=bool)
    for start in range(0, len(labels), _LABEL_SLICE):
        seen[labels[start : start + _LABEL_SLICE]] = True
    return int(np.count_nonzero(seen))


def _apply_num_classes(dataset, num_classes: int, source: str):
    """A configured class count may exceed the labels (it sizes the classifier) but never fall short."""
    if num_classes <= 0:
        return dataset
    largest = int(dataset.labels.max())
    if largest >= num_classes:
        raise PlscError(
            f"data.num_classes is {num_classes} but the {source} data has label {largest}; "
            f"set data.num_classes >= {largest + 1} or 0 to read it from the labels"
        )
    present = count_distinct(dataset.labels, largest)
    # Allowed (training on part of a larger set), but usually a config written for other data. Synthetic
    # data (capacity trials) draws few labels from many classes on purpose.
    if num_classes > present and source != "synthetic":
        log.warning("data.num_classes is %d but the %s data has %d distinct labels: %d class centers are "
                    "never trained as a positive", num_classes, source, present, num_classes - present)
    dataset.num_classes = num_classes
    return dataset


def build_dataset(data_cfg, seed: int = 0, verify_images: bool = False):
    """The training data set described by a plsc.config.DataConfig (source folder, rec or synthetic)."""
    if data_cfg.source == "folder":
        skip_bad = data_cfg.skip_bad_samples
        dataset = FolderDataset(data_cfg.root, data_cfg.label_file, skip_bad, verify_images=verify_images)
    elif data_cfg.source == "rec":
        dataset = _build_record_dataset(data_cfg)
    elif data_cfg.source == "synthetic":
        dataset = _build_synthetic_dataset(data_cfg, seed)
    else:
        raise PlscError(f"data.source must be folder, rec or synthetic, got {data_cfg.source!r}")
    return _apply_num_classes(dataset, data_cfg.num_classes, data_cfg.source)
