"""Opening a ``.rec`` at scale: time and per-process peak RSS of ``RecordDataset(rec)``, per sample.

Writes a synthetic ``.rec``/``.idx`` (InsightFace layout: header record, N image records with tiny payloads,
one record per identity; or im2rec's flat layout with shuffled keys), then opens it in fresh processes:

- ``first``: no label index cache yet (the old code: every open; the new code: builds the cache once);
- ``cached_cold``: the cache exists, the ``.rec``/``.idx``/cache pages were evicted from the page cache first
  (``posix_fadvise(DONTNEED)``, no root needed), as on a node's first start;
- ``cached_warm``: the cache exists and its pages are in memory, as on the other ranks of the node.

- ``uncached_cold``: ``index_cache="off"``, files evicted: every record header read, as before the cache.

For each: wall seconds, the process's RSS before opening, its peak RSS (``VmHWM``, reset just before) and
its RSS after, and (peak - before) / samples. ``--rank-start`` also times what a rank runs at start with the
cache current: ``plsc.data.build_dataset`` with ``data.num_classes`` set (the open plus the class-count
checks) and the sampler's first epoch of 8 ranks (imports Paddle). ``--ranks N`` starts N processes at once
with no cache, as the ranks of a node on its first start: one builds the index, the others wait and map it.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/rec_index_startup.py --records 3000000 --work /tmp/recbench \
        --json benchmarks/results/rec_index_startup.json --label after

Run it once with ``PYTHONPATH`` on a tree without the cache and ``--label before`` to compare (that tree's
opens all read every header: ``again_cold``, ``again_warm``); results of several labels are merged into the
one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MAGIC = 0xCED7230A
PART_HEADER_BYTES = 8  # magic, lrecord
IR_HEADER_BYTES = 24  # flag, label, id, id2
BLOCK_BYTES = 64 << 20  # records written per block: at most this many bytes of them


# ------------------------------------------------------------------------------------------------------------
# Synthetic files, written from the format's facts (not through plsc's writer, which is far slower per record)


def image_record_dtype(payload_bytes: int) -> np.dtype:
    """One whole-part record holding an IRHeader with a scalar label and ``payload_bytes`` zero bytes."""
    return np.dtype({"names": ["magic", "lrecord", "flag", "label", "id", "id2"],
                     "formats": ["<u4", "<u4", "<u4", "<f4", "<u8", "<u8"],
                     "offsets": [0, 4, 8, 12, 16, 24],
                     "itemsize": PART_HEADER_BYTES + IR_HEADER_BYTES + payload_bytes})


def range_record_dtype() -> np.dtype:
    """A record of an IRHeader with flag 2 and two float32 labels, no payload (header, identity records)."""
    return np.dtype({"names": ["magic", "lrecord", "flag", "label", "id", "id2", "first", "end"],
                     "formats": ["<u4", "<u4", "<u4", "<f4", "<u8", "<u8", "<f4", "<f4"],
                     "offsets": [0, 4, 8, 12, 16, 24, 32, 36], "itemsize": 40})


def range_records(keys: np.ndarray, firsts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    records = np.zeros(len(keys), range_record_dtype())
    records["magic"], records["lrecord"], records["flag"] = MAGIC, IR_HEADER_BYTES + 8, 2
    records["id"], records["first"], records["end"] = keys, firsts, ends
    return records


def write_idx_lines(handle, keys: np.ndarray, offsets: np.ndarray) -> None:
    pairs = zip(keys.tolist(), offsets.tolist(), strict=True)
    handle.write("".join(f"{key}\t{offset}\n" for key, offset in pairs))


def write_synthetic(prefix: Path, images: int, per_class: int, payload_bytes: int, layout: str) -> dict:
    """``prefix.rec``/``.idx`` with ``images`` images of ``per_class`` images per class, labels in order."""
    if payload_bytes % 4:
        raise SystemExit("--payload-bytes must be a multiple of 4 (records then need no padding)")
    rec, idx = prefix.with_suffix(".rec"), prefix.with_suffix(".idx")
    classes = -(-images // per_class)
    image_dtype = image_record_dtype(payload_bytes)
    header_records = 1 if layout == "insightface" else 0
    # im2rec (the layout insightface documents for WebFace42M) keys records by their shuffled list position
    keys = (np.random.default_rng(0).permutation(images) if layout == "im2rec"
            else np.arange(header_records, header_records + images))
    offset = 0
    with open(rec, "wb") as rec_file, open(idx, "w", encoding="ascii") as idx_file:
        if layout == "insightface":
            first_identity = images + 1
            end = first_identity + classes
            record = range_records(np.array([0]), np.array([first_identity]), np.array([end]))
            rec_file.write(record.tobytes())
            write_idx_lines(idx_file, np.array([0]), np.array([0]))
            offset = record.nbytes
        block = max(1, BLOCK_BYTES // image_dtype.itemsize)
        for start in range(0, images, block):
            count = min(block, images - start)
            records = np.zeros(count, image_dtype)
            records["magic"], records["lrecord"] = MAGIC, IR_HEADER_BYTES + payload_bytes
            records["label"] = np.arange(start, start + count) // per_class
            records["id"] = keys[start:start + count]
            rec_file.write(records.tobytes())
            offsets = offset + np.arange(count) * image_dtype.itemsize
            write_idx_lines(idx_file, keys[start:start + count], offsets)
            offset += records.nbytes
        if layout == "insightface":
            labels = np.arange(classes)
            firsts = 1 + labels * per_class
            ends = np.minimum(firsts + per_class, images + 1)
            identity = range_records(first_identity + labels, firsts, ends)
            rec_file.write(identity.tobytes())
            write_idx_lines(idx_file, first_identity + labels, offset + np.arange(classes) * 40)
        for handle in (rec_file, idx_file):
            handle.flush()
            os.fsync(handle.fileno())
    return {"images": images, "classes": classes, "payload_bytes": payload_bytes, "layout": layout,
            "rec_bytes": rec.stat().st_size, "idx_bytes": idx.stat().st_size}


# ------------------------------------------------------------------------------------------------------------
# Measuring one open in a fresh process


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) over from the current RSS: ``ru_maxrss`` would keep the parent's peak across
    fork and exec, and this process's import peak."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise SystemExit("no VmHWM in /proc/self/status")


def evict(paths) -> None:
    """Drop the files' clean pages from the page cache (a cold open reads them from disk again)."""
    for path in paths:
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


RANKS_PER_NODE, RANK_BATCH = 8, 128  # the sampler of --rank-start: one node of 8 ranks, PLSC's batch


def child(rec: Path, what: str, num_classes: int) -> dict:
    """Runs in a fresh interpreter: open ``rec`` and report time and memory."""
    if what == "rank_start":
        from plsc.config import DataConfig
        from plsc.data import build_dataset
        from plsc.data.loader import DistributedShuffleSampler
    from plsc.data.recordio import RecordDataset

    peak_before = peak_rss_bytes()
    reset_peak_rss()
    before = rss_bytes()
    start = time.perf_counter()
    if what == "rank_start":
        config = DataConfig(source="rec", root=str(rec.parent), rec_file=rec.name, num_classes=num_classes)
        dataset = build_dataset(config)
        sampler = DistributedShuffleSampler(len(dataset), RANK_BATCH, 0, RANKS_PER_NODE)
        sampler.rank_batches()  # the first epoch's permutation, drawn when the loader starts
    elif what == "open_uncached":
        dataset = RecordDataset(rec, index_cache="off")
    else:
        dataset = RecordDataset(rec)
    seconds = time.perf_counter() - start
    samples = len(dataset)
    peak, after = peak_rss_bytes(), rss_bytes()
    return {"seconds": seconds, "samples": samples, "num_classes": int(dataset.num_classes),
            "rss_before": before, "peak_rss_before_open": peak_before, "peak_rss": peak, "rss_after": after,
            "peak_delta_bytes_per_sample": (peak - before) / samples,
            "kept_bytes_per_sample": (after - before) / samples}


def child_command(rec: Path, what: str, num_classes: int = 0) -> list[str]:
    return [sys.executable, __file__, "--child", what, str(rec), str(num_classes)]


def child_result(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def index_file(rec: Path) -> Path:
    """Where plsc keeps the label index of ``rec`` (its folder is writable here)."""
    return rec.with_name(rec.stem + ".plsc-index")


def evict_all(rec: Path) -> None:
    evict([rec, rec.with_suffix(".idx"), index_file(rec)])


def measure(rec: Path, what: str, cold: bool, num_classes: int = 0) -> dict:
    if cold:
        evict_all(rec)
    load_before = os.getloadavg()  # other work on the machine slows the timings, not the memory figures
    command = child_command(rec, what, num_classes)
    result = child_result(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    result["cold"] = cold
    result["load_average_before"] = load_before
    return result


def measure_together(rec: Path, ranks: int) -> dict:
    """``ranks`` processes opening ``rec`` at once, no index yet, files evicted: a node's first start."""
    remove_caches(rec)
    evict_all(rec)
    load_before = os.getloadavg()
    start = time.perf_counter()
    processes = [subprocess.Popen(child_command(rec, "open"), stdout=subprocess.PIPE, text=True)
                 for _ in range(ranks)]
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit("a rank of --ranks failed")
    results = [child_result(output) for output in outputs]
    return {"ranks": ranks, "wall_seconds": time.perf_counter() - start, "load_average_before": load_before,
            "seconds": [result["seconds"] for result in results],
            "peak_delta_bytes_per_sample": [result["peak_delta_bytes_per_sample"] for result in results],
            "index_written": index_file(rec).exists()}


METHOD = {
    "seconds": "wall time of RecordDataset(rec) (rank_start: build_dataset and the first epoch's sampler) in "
               "a fresh process, Python already started and modules imported",
    "peak_delta_bytes_per_sample": "(VmHWM after - RSS before) / images, VmHWM reset just before the open; "
                                   "RSS counts the mapped pages of the index file",
    "cold": "the .rec, .idx and index files' pages evicted with posix_fadvise(DONTNEED) just before",
}


def remove_caches(rec: Path) -> None:
    index_file(rec).unlink(missing_ok=True)


def run(args) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    prefix = args.work / f"synthetic_{args.layout}_{args.records}_{args.payload_bytes}"
    rec = prefix.with_suffix(".rec")
    spec = {"images": args.records, "per_class": args.per_class, "payload_bytes": args.payload_bytes,
            "layout": args.layout}
    spec_file = prefix.with_suffix(".json")
    if not (rec.exists() and spec_file.exists() and json.loads(spec_file.read_text())["spec"] == spec):
        start = time.perf_counter()
        written = write_synthetic(prefix, args.records, args.per_class, args.payload_bytes, args.layout)
        spec_file.write_text(json.dumps({"spec": spec, "written": written,
                                         "write_seconds": time.perf_counter() - start}))
    files = json.loads(spec_file.read_text())["written"]
    remove_caches(rec)
    results = {"files": files, "cpu_count": os.cpu_count(), "method": METHOD,
               "first": measure(rec, "open", cold=True)}
    cached = index_file(rec).exists()
    results["cache_written"] = cached
    results["cache_bytes"] = index_file(rec).stat().st_size if cached else 0
    results["cached_cold" if cached else "again_cold"] = measure(rec, "open", cold=True)
    results["cached_warm" if cached else "again_warm"] = measure(rec, "open", cold=False)
    if cached:
        results["uncached_cold"] = measure(rec, "open_uncached", cold=True)
    if args.rank_start:
        results["rank_start_warm"] = measure(rec, "rank_start", cold=False, num_classes=files["classes"])
    if args.ranks:
        results["ranks_together"] = measure_together(rec, args.ranks)
    if args.clean:
        shutil.rmtree(args.work)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3_000_000, help="image records")
    parser.add_argument("--per-class", type=int, default=20, help="images per identity")
    parser.add_argument("--payload-bytes", type=int, default=8, help="bytes of each image payload")
    parser.add_argument("--layout", choices=["insightface", "im2rec"], default="insightface")
    parser.add_argument("--work", type=Path, default=Path("/tmp/plsc_rec_index_bench"),
                        help="folder of the synthetic files (kept between runs unless --clean)")
    parser.add_argument("--json", type=Path, help="results file; this run goes under --label")
    parser.add_argument("--label", default="current", help="name of this run in the results file")
    parser.add_argument("--rank-start", action="store_true",
                        help="also time build_dataset and the first epoch's sampler (imports Paddle)")
    parser.add_argument("--ranks", type=int, default=0,
                        help="also start this many processes at once with no index yet")
    parser.add_argument("--clean", action="store_true", help="remove --work afterwards")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "REC", "CLASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[1]), args.child[0], int(args.child[2]))))
        return 0
    results = run(args)
    print(json.dumps(results, indent=1))
    if args.json:
        merged = json.loads(args.json.read_text()) if args.json.exists() else {}
        key = f"{args.label}/{args.layout}_{args.records}x{args.payload_bytes}B"
        merged[key] = results
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
