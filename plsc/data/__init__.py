"""Training data: data sets (folder, synthetic; RecordIO in plsc.data.recordio), transforms and the loader.

The loader names import paddle (about a second), so they are resolved on first use; importing a data set
module, e.g. plsc.data.verification_bin, stays cheap.
"""

from plsc.data.folder import FolderDataset, read_image
from plsc.data.synthetic import SyntheticDataset
from plsc.data.transforms import EvalTransform, TrainBatches, TrainTransform, flip_draws, normalize_batch

_LOADER_NAMES = (
    "DistributedShuffleSampler",
    "build_dataset",
    "count_samples",
    "build_train_loader",
    "build_train_loader_from_config",
    "TrainLoader",
)

__all__ = [
    "EvalTransform",
    "FolderDataset",
    "SyntheticDataset",
    "TrainBatches",
    "TrainTransform",
    "read_image",
    "flip_draws",
    "normalize_batch",
    *_LOADER_NAMES,
]


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from plsc.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'plsc.data' has no attribute {name!r}")
