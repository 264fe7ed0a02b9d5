"""``plsc bench data``: images/s of the real training loader beside the raw JPEG decode rate, in one run.

The pipeline is plsc's own: ``build_dataset`` (folder or RecordIO) and ``build_train_loader`` with ``k``
workers, i.e. read + decode + resize + flip + layout, straight into a shared batch slot, + hand-over to the
main process (the slot lent as the batch tensor), as ``plsc train`` iterates it (the trainer normalises the
batch tensor). The raw rate is
``cv2.imdecode`` of the same encoded bytes (read into memory first), in one process on one thread: the work
one worker cannot avoid. Their ratio
``pipeline / (raw x max(workers, 1))`` says how much of the workers' decoding capacity reaches the trainer
(0 workers: the main process decodes, so the divisor is one process). Beside them, ``stage_us_per_image``
splits one process's work per image into read, decode, augment (flip draw and TrainTransform.write_pixels:
resize, flip, layout, straight into the batch), the workers' share, hand_over (the batch array as a tensor,
as the loader lends a slot, and the labels), the main process's, and normalize
(plsc.data.transforms.normalize_batch), which the training step does on the batch tensor, to show where the
time goes.

Small data sets (the bundled data/tiny has 240 images) are repeated, in order, as many times as it takes to
fill ``warmup + batches`` batches in one epoch of the loader, so the timed batches are steady state: no
worker start-up between epochs. Repeated images come from the page cache, as on a warm run.

``--source rec`` with a folder root converts it once into a temporary directory with ``plsc convert
images2rec`` (plsc.data.convert.images_to_rec), so folder and rec read the very same encoded images.

The measurement runs in a fresh process (``python -m plsc.bench.data SPEC_JSON``) whose OMP_NUM_THREADS is set
before Paddle is imported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from plsc.bench.head import PhaseClock
from plsc.errors import PlscError

SOURCES = ("folder", "rec")
TARGET_RATIO = 0.8
BUNDLED_ROOT = Path(__file__).resolve().parents[2] / "data" / "tiny"


@dataclass(frozen=True)
class DataBenchSpec:
    source: str  # folder or rec
    root: str  # folder: holds label.txt and images/; rec: holds rec_file and its .idx
    workers: int
    batches: int = 150  # timed batches per round (~0.5 s of pipeline)
    rounds: int = 3  # raw decode then pipeline, this many times (a new epoch each; the workers stay)
    warmup: int = 3  # untimed batches first (worker start-up, first reads)
    batch_size: int = 64
    image_size: int = 112
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    rec_file: str = "train.rec"


# --- input checks and RecordIO preparation (calling process, no Paddle) -----------------------------------


def check_spec(spec: DataBenchSpec) -> None:
    """One-line PlscErrors for bad arguments, before any process is started."""
    if spec.source not in SOURCES:
        raise PlscError(f"--source must be one of {', '.join(SOURCES)}, got {spec.source!r}")
    for name in ("batches", "rounds", "batch_size", "image_size", "threads"):
        if getattr(spec, name) < 1:
            raise PlscError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.workers < 0 or spec.warmup < 0:
        raise PlscError(f"--workers and --warmup must be >= 0, got {spec.workers} and {spec.warmup}")
    root = Path(spec.root)
    if not root.is_dir():
        raise PlscError(f"--root is not a directory: {root}")
    if not has_folder_layout(root) and not (spec.source == "rec" and (root / spec.rec_file).is_file()):
        wanted = "label.txt" if spec.source == "folder" else f"label.txt or {spec.rec_file}"
        raise PlscError(f"--root {root} holds no {wanted}")


def has_folder_layout(root: Path) -> bool:
    return (root / "label.txt").is_file()


@contextmanager
def prepared_root(spec: DataBenchSpec):
    """Yields (spec whose root the loader reads, seconds spent converting): a folder root read as rec is
    converted into a temporary directory, removed afterwards."""
    root = Path(spec.root).resolve()
    if spec.source == "folder" or (root / spec.rec_file).is_file():
        yield replace(spec, root=str(root)), 0.0
        return
    from plsc.data.convert import images_to_rec

    with tempfile.TemporaryDirectory(prefix="plsc-bench-rec-") as temp:
        started = time.perf_counter()
        images_to_rec(root, None, Path(temp) / Path(spec.rec_file).stem, progress=False)
        yield replace(spec, root=temp), time.perf_counter() - started


# --- in the measuring process ------------------------------------------------------------------------------


class RepeatedDataset:
    """``times`` passes over a data set, back to back, as one data set (index ``i`` is sample ``i mod n``)."""

    def __init__(self, dataset, times: int):
        self.dataset = dataset
        self.times = int(times)
        self.labels = np.tile(dataset.labels, self.times)
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        return self.dataset[int(index) % len(self.dataset)]


def repeats_needed(images: int, batches: int, batch_size: int) -> int:
    """Passes over ``images`` samples that fill ``batches`` full batches in one epoch."""
    return max(1, math.ceil(batches * batch_size / images))


def build_source_dataset(spec: DataBenchSpec):
    """The training data set of ``spec`` as ``plsc train`` builds it (plsc.data.loader.build_dataset)."""
    from plsc.config import DataConfig
    from plsc.data.loader import build_dataset

    config = DataConfig(source=spec.source, root=spec.root, rec_file=spec.rec_file, val_bins=[],
                        image_size=spec.image_size, num_workers=spec.workers)
    return build_dataset(config, seed=spec.seed)


def encoded_images(dataset, indices) -> list[np.ndarray]:
    """The encoded bytes of the data set's images ``indices`` (the files, or the .rec payloads), read as
    the data set reads them."""
    from plsc.data.folder import FolderDataset, read_into_thread_buffer

    if isinstance(dataset, FolderDataset):  # copied out of the reusable read buffer
        return [np.frombuffer(read_into_thread_buffer(dataset.image_path(i)), dtype=np.uint8).copy()
                for i in indices]
    return [np.frombuffer(dataset.encoded(i), dtype=np.uint8) for i in indices]


def raw_decode_rate(encoded: list[np.ndarray], decodes: int) -> float:
    """Images/s of ``cv2.imdecode`` over ``encoded`` (cycled until ``decodes`` images), on one thread."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # as in a loader worker (plsc.data.workers)
    try:
        started = time.perf_counter()
        for index in range(decodes):
            if cv2.imdecode(encoded[index % len(encoded)], cv2.IMREAD_COLOR) is None:
                raise PlscError(f"image {index % len(encoded)} of the data set cannot be decoded")
        return decodes / (time.perf_counter() - started)
    finally:
        cv2.setNumThreads(threads)


def stage_costs(dataset, spec: DataBenchSpec, count: int) -> dict[str, float]:
    """Microseconds per image of each loader stage over the first ``count`` images, batch by batch as a
    worker goes, in this process: where a worker's time goes, beside the raw decode (``decode``)."""
    import cv2
    import paddle
    from paddle.utils.dlpack import from_dlpack

    from plsc.data.transforms import TrainTransform, flip_draws, normalize_batch

    transform = TrainTransform(spec.image_size)
    clock = PhaseClock()
    for start in range(0, count, spec.batch_size):
        indices = list(range(start, min(start + spec.batch_size, count)))
        encoded = encoded_images(dataset, indices)
        clock.mark("read")
        images = [cv2.imdecode(data, cv2.IMREAD_COLOR) for data in encoded]
        clock.mark("decode")
        batch_images = np.empty((len(indices), *transform.pixel_shape), dtype=np.uint8)
        for slot, (image, flip) in enumerate(zip(images, flip_draws(spec.seed, 0, indices), strict=True)):
            transform.write_pixels(batch_images[slot], image, flip)
        clock.mark("augment")
        batch_tensor = from_dlpack(batch_images.__dlpack__())  # as the loader lends a filled slot
        paddle.to_tensor(np.zeros(len(indices), dtype=np.int64))
        clock.mark("hand_over")
        normalize_batch(batch_tensor)
        clock.mark("normalize")
    return {stage: 1e6 * seconds / count for stage, seconds in clock.wall.items()}


def pipeline_batch_times(loader, sampler, epoch: int, spec: DataBenchSpec) -> list[float]:
    """Seconds each timed batch of ``epoch`` took to arrive from the training loader, after ``spec.warmup``
    untimed ones."""
    sampler.set_epoch(epoch)
    times = []
    batches = iter(loader)
    for index in range(spec.warmup + spec.batches):
        started = time.perf_counter()
        next(batches)
        if index >= spec.warmup:
            times.append(time.perf_counter() - started)
    batches.close()
    return times


def measure(spec: DataBenchSpec) -> dict:
    import paddle

    from plsc.data.loader import build_train_loader

    dataset = build_source_dataset(spec)
    images_timed = spec.batches * spec.batch_size
    encoded = encoded_images(dataset, range(min(len(dataset), images_timed)))
    stages = stage_costs(dataset, spec, len(encoded))
    repeats = repeats_needed(len(dataset), spec.warmup + spec.batches, spec.batch_size)
    repeated = RepeatedDataset(dataset, repeats)
    loader, sampler = build_train_loader(repeated, batch_size=spec.batch_size, image_size=spec.image_size,
                                         num_workers=spec.workers, seed=spec.seed)
    rounds = []  # (raw decode, pipeline) images/s, measured back to back
    for epoch in range(spec.rounds):
        raw = raw_decode_rate(encoded, images_timed)
        times = pipeline_batch_times(loader, sampler, epoch, spec)
        rounds.append((raw, images_timed / sum(times)))
    loader.close()
    raws, pipelines = [raw for raw, _ in rounds], [pipeline for _, pipeline in rounds]
    divisor = max(spec.workers, 1)
    return {
        "pipeline_images_per_s": float(np.median(pipelines)),
        "raw_decode_images_per_s": float(np.median(raws)),
        "workers": spec.workers,
        # Each round's pipeline over the raw rate measured just before it: steadier than a ratio of medians.
        "ratio_to_workers_x_raw": float(np.median([pipeline / (raw * divisor) for raw, pipeline in rounds])),
        "rounds": [{"raw_decode_images_per_s": raw, "pipeline_images_per_s": pipeline}
                   for raw, pipeline in rounds],
        "dataset_images": len(dataset),
        "images_timed": images_timed,
        "raw_decode_distinct_images": len(encoded),
        "stage_us_per_image": stages,
        "batch_s_median_last_round": float(np.median(times)),
        "batch_s_all_last_round": times,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "paddle_version": paddle.__version__,
    }


# --- the whole benchmark (calling process) -----------------------------------------------------------------


def method_notes(spec: DataBenchSpec) -> dict:
    workers = max(spec.workers, 1)
    return {
        "pipeline_method": f"{spec.batches} batches of {spec.batch_size} from plsc.data.loader."
                           f"build_train_loader over build_dataset(source={spec.source}) with {spec.workers} "
                           f"workers, after {spec.warmup} untimed batches; images / summed wait for each "
                           f"batch (next(loader)); small data sets repeated within one epoch; median of "
                           f"{spec.rounds} rounds (epochs of the same loader)",
        "raw_decode_method": "cv2.imdecode(IMREAD_COLOR) of the same encoded bytes held in memory, one "
                             "process, cv2.setNumThreads(1), same process and run as the pipeline, just "
                             f"before each of its rounds; median of {spec.rounds}",
        "stage_method": "microseconds per image of read, cv2.imdecode, flip_draws + TrainTransform."
                        "write_pixels into the batch array (the workers' share), from_dlpack of the batch "
                        "and to_tensor of the labels (the main process's hand-over) and normalize_batch (the "
                        "trainer's, on the batch tensor), batch by batch in the "
                        "measuring process (default cv2 threads) over the raw decode's distinct images",
        "ratio_method": f"median over rounds of pipeline / (raw decode just before it x {workers})"
                        + (" (0 workers: the main process decodes)" if spec.workers == 0 else ""),
    }


def bench_data(spec: DataBenchSpec) -> dict:
    from plsc.bench import measure_in_fresh_process

    check_spec(spec)
    with prepared_root(spec) as (prepared, conversion_s):
        result = {"source": spec.source, "root": str(Path(spec.root).resolve()), "threads": spec.threads,
                  "batch_size": spec.batch_size, "image_size": spec.image_size, "batches": spec.batches,
                  "warmup": spec.warmup, "rec_conversion_s": conversion_s if spec.source == "rec" else None}
        result["load_average_before"] = os.getloadavg()
        result.update(measure_in_fresh_process("plsc.bench.data", asdict(prepared), spec.threads))
        result["load_average_after"] = os.getloadavg()
    result["target_ratio"] = TARGET_RATIO
    result.update(method_notes(spec))
    result["python"] = sys.version.split()[0]
    return result


def table(result: dict) -> str:
    from tabulate import tabulate

    rows = [
        ["source, root", f"{result['source']}, {result['root']}"],
        ["images in data set", f"{result['dataset_images']:,}"],
        ["workers, threads", f"{result['workers']}, {result['threads']}"],
        ["pipeline", f"{result['pipeline_images_per_s']:,.0f} images/s"],
        ["raw decode (1 process)", f"{result['raw_decode_images_per_s']:,.0f} images/s"],
        ["pipeline / (raw x workers)", f"{result['ratio_to_workers_x_raw']:.2f} (target >= {TARGET_RATIO})"],
        ["one process, us / image", ", ".join(f"{stage} {micros:.0f}"
                                              for stage, micros in result["stage_us_per_image"].items())],
    ]
    return tabulate(rows, tablefmt="simple")


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m plsc.bench.data SPEC_JSON``; prints one JSON line."""
    from plsc.bench import child_main

    return child_main(lambda text: measure(DataBenchSpec(**json.loads(text))), argv)


if __name__ == "__main__":
    sys.exit(main())
