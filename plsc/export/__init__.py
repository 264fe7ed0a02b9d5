"""Deployment: export a checkpoint for Paddle Inference or ONNX Runtime, and embed images with the export.

PLSC v2.2 checkpoints are imported by :mod:`plsc.checkpoint.plsc22`; every entry point that takes a checkpoint
folder accepts them too.
"""

from plsc.export.exporter import EXPORT_JSON, FORMATS, export_checkpoint, nchw_twin, read_description
from plsc.export.infer import (
    ENGINES,
    ExportedModel,
    embed_images,
    embeddings_path,
    list_images,
    load_batch,
    locate_model,
    open_engine,
    run_inference,
    save_embeddings,
)

__all__ = [
    "ENGINES",
    "EXPORT_JSON",
    "FORMATS",
    "ExportedModel",
    "embed_images",
    "embeddings_path",
    "export_checkpoint",
    "list_images",
    "load_batch",
    "locate_model",
    "nchw_twin",
    "open_engine",
    "read_description",
    "run_inference",
    "save_embeddings",
]
