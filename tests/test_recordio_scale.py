""".rec files at WebFace42M scale: the cached label index (opening without reading record headers, staleness,
damage, where it is written, concurrent opens) and the im2rec layout past float32's exact range (2**24)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from plsc import cli
from plsc.data import recordio
from plsc.data.convert import images_to_rec, rec_to_images
from plsc.data.recordio import (
    IRHeader,
    RecordDataset,
    RecordReader,
    RecordWriter,
    count_record_images,
    pack,
    write_insightface,
)
from plsc.data.recordio_index import IndexFileError, index_locations, load_current_index, read_index_file
from plsc.errors import PlscError

MXNET_FILES = ["faces_tiny", "faces_tiny_multilabel", "flat", "split"]
FLOAT32_EXACT = 2**24


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Indexes of read-only .rec folders (../shared) go here, never to the user's ~/.cache."""
    directory = tmp_path / "index-cache"
    monkeypatch.setenv("PLSC_CACHE_DIR", str(directory))
    return directory


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_flat(rec: Path, labels, keys=None, payloads=None) -> None:
    """im2rec-style records through RecordWriter (byte-identical to MXNet's, tests/test_recordio.py)."""
    keys = list(range(len(labels))) if keys is None else keys
    payloads = [f"image {key}".encode() for key in keys] if payloads is None else payloads
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for key, label, payload in zip(keys, labels, payloads, strict=True):
            writer.write(pack(IRHeader(0, float(label), key, 0), payload), key=key)


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------------------------
# The cached index equals the full header scan


@pytest.mark.parametrize("name", MXNET_FILES)
def test_cached_open_equals_the_header_scan_and_mxnet(recordio_dir, recordio_manifest, cache_dir, name):
    rec = recordio_dir / f"{name}.rec"
    built = RecordDataset(rec)  # ../shared is read-only: the index goes to PLSC_CACHE_DIR
    cached = RecordDataset(rec)
    scanned = RecordDataset(rec, index_cache="off")
    assert built.index.path is not None and built.index.path.parent == cache_dir
    assert cached.index.path == built.index.path and scanned.index.path is None
    expected = recordio_manifest[name]
    image_keys = [int(key) for key, record in expected.items() if record["payload_len"] > 0]
    for dataset in (cached, scanned):
        assert sorted(dataset.image_keys.tolist()) == sorted(image_keys)
        for position, key in enumerate(dataset.image_keys.tolist()):
            record = expected[str(key)]
            label = record["label"][0] if record["flag"] else record["label"]
            assert int(dataset.labels[position]) == label, key
            payload = dataset.encoded(position)
            assert (len(payload), md5(payload)) == (record["payload_len"], record["payload_md5"]), key
    assert np.array_equal(cached.labels, scanned.labels)
    assert np.array_equal(cached.image_keys, scanned.image_keys)
    assert (cached.layout, cached.num_classes) == (scanned.layout, scanned.num_classes)


def test_opening_with_a_current_index_reads_no_record_header(tiny_samples, tmp_path, monkeypatch):
    rec = tmp_path / "train.rec"
    write_insightface(tmp_path / "train", tiny_samples)
    first = RecordDataset(rec)

    def forbidden(*args, **kwargs):
        raise AssertionError("opening read the .idx or record headers")

    for method in ("image_headers", "_header_at", "read_at", "_ensure_index"):
        monkeypatch.setattr(RecordReader, method, forbidden)
    monkeypatch.setattr(recordio, "build_image_index", forbidden)
    second = RecordDataset(rec)
    assert np.array_equal(second.labels, first.labels) and len(second) == 240
    assert np.array_equal(second[239][0], first[239][0]) and second[239][1] == 39
    assert count_record_images(rec) == 240


def test_index_file_sits_beside_a_writable_rec(tiny_samples, tmp_path, cache_dir, caplog):
    write_insightface(tmp_path / "train", tiny_samples)
    with caplog.at_level(logging.INFO, logger="plsc"):
        dataset = RecordDataset(tmp_path / "train.rec")
    assert dataset.index.path == tmp_path / "train.plsc-index"
    assert not cache_dir.exists()
    assert warnings_of(caplog) == []


# ------------------------------------------------------------------------------------------------------------
# Stale and damaged index files


def test_stale_index_is_detected_and_rebuilt(tmp_path, caplog):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    write_flat(rec, [0, 1, 1, 2])
    assert RecordDataset(rec).index.path == tmp_path / "train.plsc-index"

    stat = rec.stat()
    os.utime(rec, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new time
    assert load_current_index(rec, idx, recordio.LABEL_LIMIT) is None
    with caplog.at_level(logging.WARNING, logger="plsc"):
        dataset = RecordDataset(rec)
    assert warnings_of(caplog) == [f"{tmp_path / 'train.plsc-index'}: stale (train.rec was modified since); "
                                   "rebuilding"]
    assert load_current_index(rec, idx, recordio.LABEL_LIMIT) is not None
    assert dataset.labels.tolist() == [0, 1, 1, 2]

    caplog.clear()
    write_flat(rec, [3, 1, 1, 2, 0])  # new size, new labels
    with caplog.at_level(logging.WARNING, logger="plsc"):
        dataset = RecordDataset(rec)
    (warning,) = warnings_of(caplog)
    assert "stale (train.rec changed size" in warning
    assert dataset.labels.tolist() == [3, 1, 1, 2, 0] and dataset.num_classes == 4

    caplog.clear()
    idx.write_text(idx.read_text())  # an .idx rewritten: its time changes
    os.utime(idx, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    with caplog.at_level(logging.WARNING, logger="plsc"):
        RecordDataset(rec)
    assert warnings_of(caplog) == [f"{tmp_path / 'train.plsc-index'}: stale (train.idx was modified since); "
                                   "rebuilding"]


def index_layout(path: Path) -> tuple[dict, int]:
    """The metadata and the offset where it ends, parsed here from the format's description."""
    data = path.read_bytes()
    magic, length = struct.unpack_from("<8sI", data)
    assert magic == b"PLSCRIX\0"
    return json.loads(data[12 : 12 + length]), 12 + length


def patched(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))


def damages(path: Path):
    """(name, function damaging the index file at ``path``) pairs."""
    metadata, end = index_layout(path)
    columns, size = metadata["columns"], path.stat().st_size
    text = path.read_bytes()[12:end]

    def metadata_field(name, value):
        def damage():
            changed = dict(metadata, **{name: value})
            patched(path, 12, json.dumps(changed).encode().ljust(len(text))[: len(text)])
        return damage

    return [
        ("empty", lambda: path.write_bytes(b"")),
        *[(f"cut at {cut}", lambda cut=cut: path.write_bytes(path.read_bytes()[:cut]))
          for cut in (5, 12, 40, end, size // 2, size - 1)],
        ("one byte more", lambda: path.write_bytes(path.read_bytes() + b"\0")),
        ("bad magic", lambda: patched(path, 0, b"NOTANIDX")),
        ("huge metadata length", lambda: patched(path, 8, struct.pack("<I", 2**31))),
        ("metadata not JSON", lambda: patched(path, 12, b"{{{{")),
        ("images is true", metadata_field("images", True)),
        ("images too many", metadata_field("images", metadata["images"] * 1000)),
        ("unknown layout", metadata_field("layout", "mystery")),
        ("other format", metadata_field("format", 99)),
        ("column misaligned", metadata_field("columns", dict(columns, labels=columns["labels"] + 4))),
        ("columns overlap", metadata_field("columns", dict(columns, labels=columns["payload_lengths"]))),
        ("negative label", lambda: patched(path, columns["labels"], struct.pack("<i", -1))),
        ("label too large", lambda: patched(path, columns["labels"], struct.pack("<i", 2**30))),
        ("payload past the .rec", lambda: patched(path, columns["payload_starts"], struct.pack("<q", 2**40))),
        ("payload inside a header", lambda: patched(path, columns["payload_starts"], struct.pack("<q", 4))),
        # start + length wraps past 2**63 to a negative end, which a bare "end <= size" check would pass
        ("payload end wraps around", lambda: patched(path, columns["payload_starts"],
                                                      struct.pack("<q", 2**63 - 8))),
        ("record offset unaligned", lambda: patched(path, columns["payload_starts"], struct.pack("<q", -4))),
        ("fewer classes", metadata_field("num_classes", 1)),
    ]


def test_damaged_index_is_one_line_and_rebuilt(tiny_samples, tmp_path, caplog):
    write_insightface(tmp_path / "train", tiny_samples)
    rec, path = tmp_path / "train.rec", tmp_path / "train.plsc-index"
    expected = RecordDataset(rec).labels.copy()
    good = path.read_bytes()
    for name, damage in damages(path):
        path.write_bytes(good)
        damage()
        with pytest.raises(IndexFileError) as error:
            read_index_file(path, rec.stat().st_size, recordio.LABEL_LIMIT)
        message = str(error.value)
        assert message.startswith(str(path)) and "\n" not in message, name
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="plsc"):
            dataset = RecordDataset(rec)
        (warning,) = warnings_of(caplog)
        assert warning == f"{message}; rebuilding", name
        assert np.array_equal(dataset.labels, expected), name
        assert path.read_bytes() == good, name  # rebuilt to the same bytes


def test_random_damage_never_escapes_as_another_error(tiny_samples, tmp_path):
    write_insightface(tmp_path / "train", tiny_samples)
    rec, path = tmp_path / "train.rec", tmp_path / "train.plsc-index"
    RecordDataset(rec)
    good = path.read_bytes()
    rng = np.random.default_rng(3)
    refused = 0
    for _ in range(300):
        data = bytearray(good)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            data[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            read_index_file(path, rec.stat().st_size, recordio.LABEL_LIMIT)
        except IndexFileError as error:
            assert "\n" not in str(error)
            refused += 1
    assert refused > 0  # the format has no checksum: a flipped byte inside a column can pass its checks


# ------------------------------------------------------------------------------------------------------------
# Where the index goes, and several processes opening at once


def test_read_only_folder_caches_elsewhere_or_builds_in_memory(tmp_path, cache_dir, caplog, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rec = data / "train.rec"
    write_flat(rec, [1, 0, 2])
    data.chmod(0o555)  # root could still write there: plsc goes by the folder's mode
    try:
        with caplog.at_level(logging.WARNING, logger="plsc"):
            dataset = RecordDataset(rec)
        cached_at = index_locations(rec)[1]
        assert dataset.index.path == cached_at and cached_at.parent == cache_dir
        assert warnings_of(caplog) == [f"{rec}: folder not writable; label index cached at {cached_at} "
                                       "(set PLSC_CACHE_DIR to choose)"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="plsc"):
            assert RecordDataset(rec).labels.tolist() == [1, 0, 2]
        assert warnings_of(caplog) == []

        cache_dir.chmod(0o555)
        cached_at.unlink()
        with caplog.at_level(logging.WARNING, logger="plsc"):
            dataset = RecordDataset(rec)
        (warning,) = warnings_of(caplog)
        assert warning.startswith(f"{rec}: label index not cached (") and "read-only folder" in warning
        assert dataset.index.path is None and dataset.labels.tolist() == [1, 0, 2]
        assert sorted(path.name for path in data.iterdir()) == ["train.idx", "train.rec"]
    finally:
        data.chmod(0o755)
        cache_dir.chmod(0o755)


def _open_in_process(rec, barrier, results):
    barrier.wait()
    dataset = RecordDataset(rec)
    results.put((dataset.index.path is not None, dataset.labels.tolist()))


def test_processes_starting_together_build_the_index_once(tmp_path, monkeypatch):
    rec, builds = tmp_path / "train.rec", tmp_path / "builds.txt"
    labels = list(np.random.default_rng(0).integers(0, 50, size=400))
    write_flat(rec, labels)
    real_build = recordio.build_image_index

    def counted_build(*args):
        with open(builds, "a") as log:
            log.write(f"{os.getpid()}\n")
        return real_build(*args)

    monkeypatch.setattr(recordio, "build_image_index", counted_build)
    context = multiprocessing.get_context("fork")  # the children inherit the counting build
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_open_in_process, args=(rec, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert all(process.exitcode == 0 for process in processes)
    assert outcomes == [(True, [int(label) for label in labels])] * 4
    assert len(builds.read_text().splitlines()) == 1


def test_pickled_dataset_maps_its_index_again(tmp_path):
    rec = tmp_path / "train.rec"
    write_flat(rec, np.arange(20_000) % 97)
    dataset = RecordDataset(rec)
    state = pickle.dumps(dataset)
    assert len(state) < 2_000  # the file's name travels, not its 320 KB of columns
    clone = pickle.loads(state)
    assert np.array_equal(clone.labels, dataset.labels) and clone.encoded(19_999) == b"image 19999"
    write_flat(rec, np.arange(20_000) % 89)
    RecordDataset(rec)  # rebuilds: a new index file replaces the one pickled
    with pytest.raises(PlscError, match="label index changed since the data set was opened"):
        pickle.loads(state)


# ------------------------------------------------------------------------------------------------------------
# The .idx parse


@pytest.mark.parametrize("block_bytes", [5, 7, 64, 1 << 24])
@pytest.mark.parametrize("ending", ["\n", ""])
def test_idx_blocks_parse_like_python(tmp_path, monkeypatch, block_bytes, ending):
    rec = tmp_path / "train.rec"
    keys = [9, 3, 2**40, 0, 17, 5]  # any integers, in any order
    write_flat(rec, [0] * len(keys), keys=keys)
    idx = rec.with_suffix(".idx")
    idx.write_text(idx.read_text().rstrip("\n") + ending)
    expected = [tuple(int(field) for field in line.split("\t")) for line in idx.read_text().splitlines()]
    monkeypatch.setattr(recordio, "_IDX_BLOCK_BYTES", block_bytes)
    reader = RecordReader(rec, idx)
    assert list(zip(reader.keys.tolist(), reader.offsets.tolist(), strict=True)) == expected


def test_idx_duplicate_key_is_one_line(tmp_path):
    rec = tmp_path / "train.rec"
    write_flat(rec, [0, 0, 0], keys=[4, 9, 2])
    idx = rec.with_suffix(".idx")
    idx.write_text(idx.read_text().replace("2\t", "9\t"))
    with pytest.raises(PlscError, match=r"train\.idx: key 9 appears more than once"):
        RecordReader(rec, idx)


# ------------------------------------------------------------------------------------------------------------
# Past float32's exact range: the im2rec layout


def parse_records(rec: Path) -> list[tuple[int, tuple, bytes]]:
    """(offset, IRHeader fields, payload) of every record, from the format's facts (whole records only)."""
    data, records, offset = rec.read_bytes(), [], 0
    while offset < len(data):
        magic, lrecord = struct.unpack_from("<II", data, offset)
        assert magic == 0xCED7230A and lrecord >> 29 == 0
        length = lrecord & ((1 << 29) - 1)
        body = data[offset + 8 : offset + 8 + length]
        fields = struct.unpack_from("<IfQQ", body)
        records.append((offset, fields, body[24 + 4 * fields[0] :]))
        offset += 8 + (length + 3) // 4 * 4
    return records


def test_im2rec_layout_has_the_format_facts(tiny_samples, tmp_path):
    samples = tiny_samples[::-1][:50]  # not ordered by label: im2rec keeps the given order
    result = write_insightface(tmp_path / "train", samples, layout="im2rec")
    assert (result["layout"], result["images"], result["num_classes"]) == ("im2rec", 50, 40)
    records = parse_records(tmp_path / "train.rec")
    assert len(records) == 50  # no header record, no identity records
    for key, ((_, (flag, label, record_id, id2), payload), (path, expected)) in enumerate(
            zip(records, samples, strict=True)):
        assert (flag, label, record_id, id2) == (0, float(expected), key, 0)
        assert payload == path.read_bytes()
    idx_lines = (tmp_path / "train.idx").read_text().splitlines()
    assert idx_lines == [f"{key}\t{offset}" for key, (offset, _, _) in enumerate(records)]
    assert (tmp_path / "property").read_text() == "40,112,112\n"
    dataset = RecordDataset(tmp_path / "train.rec")
    assert dataset.layout == "flat" and dataset.labels.tolist() == [label for _, label in samples]


def test_auto_layout_switches_where_float32_keys_stop_being_exact(tiny_samples, tmp_path, monkeypatch):
    # 240 images + 40 classes + the header = 281 records; the limit is lowered to put them on either side
    for limit, layout in ((281, "insightface"), (280, "im2rec")):
        monkeypatch.setattr(recordio, "_FLOAT32_EXACT_LIMIT", limit)
        assert write_insightface(tmp_path / f"at{limit}" / "train", tiny_samples)["layout"] == layout
    with pytest.raises(PlscError) as error:
        write_insightface(tmp_path / "forced" / "train", tiny_samples, layout="insightface")
    assert "281 records, more than the 280" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "forced" / "train.rec").exists()


def test_labels_past_float32_range_are_refused(tmp_path):
    with pytest.raises(PlscError, match=r"label 16777216 is not below 16777216: RecordIO labels are float32"):
        write_insightface(tmp_path / "train", [(b"jpeg", 0), (b"jpeg", FLOAT32_EXACT)])
    write_flat(tmp_path / "big.rec", [3, float(FLOAT32_EXACT)])
    with pytest.raises(PlscError, match=r"key 1: label 1\.67772e\+07 is not a non-negative integer below"):
        RecordDataset(tmp_path / "big.rec")


def test_keys_and_labels_past_two_to_the_24_round_trip(tmp_path):
    keys = [FLOAT32_EXACT + 1, FLOAT32_EXACT + 3, 2**25 + 5, 2**26 + 7, 42_474_558]
    assert all(float(np.float32(key)) != key for key in keys)  # float32 could not hold any of them
    labels = [FLOAT32_EXACT - 1, 0, FLOAT32_EXACT - 3, 2_059_905, 7]  # largest exact classes; WebFace42M's
    payloads = [f"face {key}".encode() for key in keys]
    rec = tmp_path / "train.rec"
    write_flat(rec, labels, keys=keys, payloads=payloads)
    for index_cache in ("write", "write", "off"):  # builds the index, maps it, scans the headers
        dataset = RecordDataset(rec, index_cache=index_cache)
        assert dataset.layout == "flat"
        assert dataset.image_keys.tolist() == keys and dataset.labels.tolist() == labels
        assert [dataset.encoded(position) for position in range(len(keys))] == payloads
    assert RecordDataset(rec).index.path is not None


def test_images2rec_past_the_limit_round_trips(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recordio, "_FLOAT32_EXACT_LIMIT", 100)  # as if the 240 images were 17M
    prefix = tmp_path / "rec" / "train"
    assert cli.main(["convert", "images2rec", "--root", str(tiny_dir), "--output", str(prefix)]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith(f"240 images of 40 classes written to {prefix}.rec (im2rec layout)\n")
    assert len(parse_records(Path(f"{prefix}.rec"))) == 240  # images only
    summary = rec_to_images(f"{prefix}.rec", None, tmp_path / "back", progress=False)
    assert (summary.images, summary.num_classes) == (240, 40)
    assert (tmp_path / "back" / "label.txt").read_text() == (tiny_dir / "label.txt").read_text()
    for line in (tiny_dir / "label.txt").read_text().splitlines():
        name = line.split("\t")[0]
        assert (tmp_path / "back" / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert not list((tmp_path / "rec").glob("*plsc-index*"))  # a conversion leaves no index behind


def test_images_to_rec_layout_argument(tiny_dir, tmp_path):
    summary = images_to_rec(tiny_dir, None, tmp_path / "train", progress=False, layout="im2rec")
    assert summary.layout == "im2rec" and len(parse_records(tmp_path / "train.rec")) == 240
    with pytest.raises(PlscError, match="layout must be one of auto, insightface, im2rec"):
        images_to_rec(tiny_dir, None, tmp_path / "other", progress=False, layout="dali")


# ------------------------------------------------------------------------------------------------------------
# An insightface header past 2**24 holds its key rounded


def write_insightface_by_hand(prefix: Path, samples, stored_first_identity_key: float) -> None:
    """InsightFace's layout with the header's first identity key as given (as float32 would have rounded
    it), the rest as write_insightface writes it."""
    labels = [label for _, label in samples]
    first_identity_key, classes = len(samples) + 1, max(labels) + 1
    with RecordWriter(prefix.with_suffix(".rec"), prefix.with_suffix(".idx")) as writer:
        header = IRHeader(2, (stored_first_identity_key, first_identity_key + classes), 0, 0)
        writer.write(pack(header, b""), 0)
        for key, (path, label) in enumerate(samples, start=1):
            writer.write(pack(IRHeader(0, float(label), key, 0), path.read_bytes()), key)
        for label in range(classes):
            start = 1 + labels.index(label)
            end = start + labels.count(label)
            writer.write(pack(IRHeader(2, (start, end), first_identity_key + label, 0), b""),
                         first_identity_key + label)


@pytest.mark.parametrize("stored", [240.0, 241.0, 242.0])
def test_rounded_header_key_finds_the_identity_records(tiny_samples, tmp_path, monkeypatch, stored):
    # 240 images: the identity records start at key 241. Past 2**24, float32 holds such a key to +-1 (to
    # +-2 past 2**25); a radius of 1 stands for that here, as building 16.7M records would not fit a test.
    monkeypatch.setattr(recordio, "float32_rounding_radius", lambda value: 1)
    write_insightface_by_hand(tmp_path / "train", tiny_samples, stored)
    dataset = RecordDataset(tmp_path / "train.rec", index_cache="off")
    assert dataset.layout == "insightface" and len(dataset) == 240
    assert dataset.labels.tolist() == [label for _, label in tiny_samples]


def test_rounded_header_key_far_from_the_identity_records_is_one_line(tiny_samples, tmp_path, monkeypatch):
    monkeypatch.setattr(recordio, "float32_rounding_radius", lambda value: 1)
    write_insightface_by_hand(tmp_path / "train", tiny_samples, 200.0)
    with pytest.raises(PlscError, match=r"images end at key 200, which float32 holds only to \+-1, and 0 "):
        RecordDataset(tmp_path / "train.rec", index_cache="off")


def test_float32_rounding_radius_is_half_a_float32_step():
    values = (2**24 - 1, 2**24, 2**25 - 2, 2**25, 4.2e7)
    assert [recordio.float32_rounding_radius(value) for value in values] == [0, 1, 1, 2, 2]
    for value in (2**24 + 1, 2**24 + 3, 2**25 + 2, 42_474_558):
        stored = float(np.float32(value))
        assert abs(stored - value) <= recordio.float32_rounding_radius(stored)
