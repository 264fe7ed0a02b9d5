"""Convert between MXNet RecordIO (InsightFace's MS1M/Glint packaging) and PLSC's folder layout.

PLSC's layout is ``images/NNNNNNNN.jpg`` plus ``label.txt`` with ``images/NNNNNNNN.jpg<TAB>label`` lines.
Image ``i`` of the dataset (in key order) becomes file ``i + 1``, so for InsightFace's layout the file number
is the record key, and ``05179510.jpg`` is the last image of MS1MV3 as in PLSC's README.

Encoded bytes are copied verbatim in both directions: decoding and re-encoding a JPEG would cost quality and
hours on 5M images for nothing.

``rec_to_images`` can be interrupted and rerun: each image is written to a temporary name and renamed, so an
image under its final name is complete; a rerun keeps those (when their size matches) and writes the rest.
``label.txt`` is written last, also atomically, so its presence means the conversion finished.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from plsc.atomic import atomic_file, remove_stale_temps, write_atomic
from plsc.console import Progress
from plsc.console import progress as console_progress
from plsc.data.folder import FolderDataset
from plsc.data.recordio import RecordDataset, decode_image, write_insightface
from plsc.errors import PlscError

# Leading bytes -> file extension. Anything else in a record is not an image we can hand to cv2.imread.
_SIGNATURES = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


@dataclass
class ConversionSummary:
    """What a conversion did; ``written + skipped == images`` (skipped: already complete on a rerun)."""

    images: int
    num_classes: int
    written: int
    skipped: int
    copied: list[str] = field(default_factory=list)  # names of the .bin files copied alongside
    output: Path | None = None
    layout: str | None = None  # of a written .rec: "insightface" or "im2rec"


# ----------------------------------------------------------------------------------------------------------
# .rec -> images/ + label.txt


def rec_to_images(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    progress: bool = True,
) -> ConversionSummary:
    """Extract a ``.rec`` into PLSC's layout in ``output_dir`` and copy the ``.bin`` files found beside it.

    ``idx_path`` None uses the ``.idx`` beside the ``.rec`` when there is one. The ``.rec``/``.idx`` pair is
    checked and every label read before anything is written; a payload that is not an image stops the run
    with its key (the images already written stay, complete, for the rerun).
    """
    rec_path, output_dir = Path(rec_path), Path(output_dir)
    dataset = RecordDataset(rec_path, idx_path, index_cache="read")  # a one-off pass: adds no file beside it
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for directory in (output_dir, images_dir):  # what an interrupted run left: incomplete
        remove_stale_temps(directory)
    names, written = [], 0
    with Progress(len(dataset), f"{rec_path.name} -> images", "images", enabled=progress) as bar:
        for position in range(len(dataset)):
            name, was_written = _extract_image(dataset, position, images_dir)
            names.append(name)
            written += was_written
            bar.update(1)
    _write_label_file(output_dir / "label.txt", names, dataset.labels)
    copied = _copy_bin_files(rec_path.parent, output_dir)
    return ConversionSummary(
        images=len(dataset),
        num_classes=dataset.num_classes,
        written=written,
        skipped=len(dataset) - written,
        copied=copied,
        output=output_dir,
    )


def _extract_image(dataset: RecordDataset, position: int, images_dir: Path) -> tuple[str, bool]:
    """Write image ``position`` unless already complete; returns (relative name, whether it was written)."""
    payload = dataset.encoded(position)
    name = f"{position + 1:08d}{_extension(dataset, position, payload)}"
    path = images_dir / name
    # A file under its final name was renamed there whole; a size mismatch means it came from elsewhere.
    if path.is_file() and path.stat().st_size == len(payload):
        return f"images/{name}", False
    # No fsync: this guards against interruption (Ctrl-C, kill), not power loss, and 5M fsyncs would dominate.
    write_atomic(path, payload, durable=False)
    return f"images/{name}", True


def _extension(dataset: RecordDataset, position: int, payload: bytes) -> str:
    for signature, extension in _SIGNATURES:  # the common case, without building the message
        if payload.startswith(signature):
            return extension
    return image_extension(payload, f"{dataset.rec_path}: key {dataset.index.key(position)}")


def image_extension(payload: bytes, where: str) -> str:
    """The file extension for encoded image bytes (sniffed, not decoded); PlscError when not an image."""
    for signature, extension in _SIGNATURES:
        if payload.startswith(signature):
            return extension
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return ".webp"
    raise PlscError(f"{where}: payload of {len(payload)} bytes is not a JPEG/PNG/BMP/TIFF/WebP image")


def _write_label_file(path: Path, names: list[str], labels: np.ndarray) -> None:
    lines = "".join(f"{name}\t{int(label)}\n" for name, label in zip(names, labels, strict=True))
    write_atomic(path, lines.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------
# images/ + label.txt -> .rec


def images_to_rec(
    root: str | os.PathLike,
    label_file: str | os.PathLike | None,
    output_prefix: str | os.PathLike,
    progress: bool = True,
    layout: str = "auto",
) -> ConversionSummary:
    """PLSC's layout -> ``<prefix>.rec``, ``<prefix>.idx`` and ``property`` for InsightFace's trainers.

    ``label_file`` None means ``root/label.txt``; a relative ``label_file`` is taken inside ``root``, as
    everywhere in plsc, and the image paths it lists are relative to ``root``. Images are stored verbatim;
    ``layout`` is that of :func:`plsc.data.recordio.write_insightface` (auto: InsightFace's, ordered by label,
    up to 2**24 records; im2rec's, in label file order, past that). ``property`` takes its size from the first
    image. The ``.bin`` files in ``root`` are copied beside the ``.rec``. Nothing is left behind on failure.
    """
    # FolderDataset is the project's one reader of label.txt: same parsing, and every image is checked to
    # exist (with the label file's line number) before anything is written.
    folder = FolderDataset(root, str(label_file) if label_file is not None else "label.txt")
    samples = [(folder.image_path(index), int(label)) for index, label in enumerate(folder.labels)]
    height, width = decode_image(_read_bytes(samples[0][0]), str(samples[0][0])).shape[:2]
    wrap = partial(console_progress, total=len(samples), desc=f"images -> {Path(output_prefix).name}.rec",
                   unit="images", enabled=progress)
    result = write_insightface(output_prefix, samples, image_size=(height, width), progress=wrap,
                               layout=layout)
    copied = _copy_bin_files(folder.root, Path(output_prefix).parent)
    return ConversionSummary(
        images=result["images"],
        num_classes=result["num_classes"],
        written=result["images"],
        skipped=0,
        copied=copied,
        output=result["rec"],
        layout=result["layout"],
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise PlscError(f"{path}: cannot read image ({error.strerror})") from None


# ----------------------------------------------------------------------------------------------------------
# Files


def _copy_bin_files(source_dir: Path, output_dir: Path) -> list[str]:
    """Copy the verification ``.bin`` files (lfw.bin, ...) that InsightFace ships beside ``train.rec``."""
    copied = []
    for source in sorted(source_dir.glob("*.bin")):
        target = output_dir / source.name
        if target.exists() and (target.samefile(source) or target.stat().st_size == source.stat().st_size):
            continue
        with open(source, "rb") as reader, atomic_file(target) as writer:
            shutil.copyfileobj(reader, writer)
        copied.append(source.name)
    return copied


__all__ = ["ConversionSummary", "images_to_rec", "rec_to_images"]
