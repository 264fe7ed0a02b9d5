"""MXNet RecordIO: reading the files MXNet 1.9.1 wrote (shared/data/recordio), writing byte-identical ones,
RecordDataset over each layout, and the .rec <-> folder conversions with their failure behaviour."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from plsc.data import convert
from plsc.data.convert import images_to_rec, rec_to_images
from plsc.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordDataset,
    RecordReader,
    RecordWriter,
    encode_record,
    pack,
    read_property,
    split_parts,
    unpack,
    write_insightface,
)
from plsc.errors import PlscError

NAMES = ["faces_tiny", "faces_tiny_multilabel", "flat", "split"]


@pytest.fixture(autouse=True)
def index_cache_dir(tmp_path, monkeypatch):
    """Label indexes of the read-only ../shared files go to a temporary folder, not ~/.cache."""
    monkeypatch.setenv("PLSC_CACHE_DIR", str(tmp_path / "index-cache"))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.rec", directory / f"{name}.idx"


def copy_rec(recordio_dir: Path, name: str, target_dir: Path, with_idx: bool = True) -> tuple[Path, Path]:
    target_dir.mkdir(parents=True, exist_ok=True)
    rec, idx = paths(target_dir, name)
    shutil.copyfile(recordio_dir / f"{name}.rec", rec)
    if with_idx:
        shutil.copyfile(recordio_dir / f"{name}.idx", idx)
    return rec, idx


def split_payload(index: int) -> bytes:
    """The payloads MXNet wrote into split.rec: read off its bytes, confirmed by the manifest's md5."""
    return (
        bytes(range(8))
        + MAGIC_BYTES
        + bytes(range(256)) * (index + 1)
        + MAGIC_BYTES * (index + 1)
        + b"tail" * 3
    )


def raw_parts(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, continuation flag, length) of every part, parsed here independently of plsc's reader."""
    parts, offset = [], 0
    while offset < len(data):
        magic, lrecord = struct.unpack_from("<II", data, offset)
        assert magic == MAGIC
        length = lrecord & ((1 << 29) - 1)
        parts.append((offset, lrecord >> 29, length))
        offset += 8 + (length + 3) // 4 * 4
    assert offset == len(data)
    return parts


# ------------------------------------------------------------------------------------------------------------
# Reading MXNet's files


@pytest.mark.parametrize("name", NAMES)
def test_every_record_matches_the_manifest(recordio_dir, recordio_manifest, name):
    expected = recordio_manifest[name]
    with RecordReader(*paths(recordio_dir, name)) as reader:
        assert sorted(int(key) for key in reader.keys) == sorted(int(key) for key in expected)
        for key in reader.keys:
            header, payload = unpack(reader.read(key))
            want = expected[str(key)]
            label = list(header.label) if header.flag else header.label
            assert (header.flag, label, header.id, header.id2) == (
                want["flag"],
                want["label"],
                want["id"],
                want["id2"],
            ), key
            assert (len(payload), md5(payload)) == (want["payload_len"], want["payload_md5"]), key
            assert reader.read_header(key) == header


@pytest.mark.parametrize("name", NAMES)
def test_payload_spans_hold_the_manifest_payloads(recordio_dir, recordio_manifest, name):
    # the vectorised header pass against MXNet's own record checksums; split records are left to read()
    expected = recordio_manifest[name]
    with RecordReader(*paths(recordio_dir, name)) as reader:
        keys = np.asarray(reader.keys)
        starts, lengths = reader.payload_spans(keys)
        whole = 0
        for key, start, length in zip(keys.tolist(), starts.tolist(), lengths.tolist(), strict=True):
            record_is_split = len(reader.read(key)) != reader._read_part_header(reader.offset_of(key))[1]
            assert (start < 0) == record_is_split, key
            if start >= 0:
                payload = reader.read_span(start, length)
                want = expected[str(key)]
                assert (len(payload), md5(payload)) == (want["payload_len"], want["payload_md5"]), key
                whole += 1
        assert whole >= len(keys) - 10  # most records are one part
        if name == "split":
            assert (starts < 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_sequential_reading_without_idx_sees_the_same_records(recordio_dir, name):
    indexed = RecordReader(*paths(recordio_dir, name))
    in_file_order = [indexed.read(key) for key in sorted(indexed.keys, key=indexed.offset_of)]
    assert list(indexed) == in_file_order
    unindexed = RecordReader(recordio_dir / f"{name}.rec")
    assert list(unindexed.keys) == list(range(len(in_file_order)))
    assert [unindexed.read(position) for position in unindexed.keys] == in_file_order


def test_format_facts_in_mxnet_files(recordio_dir, recordio_manifest):
    tiny = (recordio_dir / "faces_tiny.rec").read_bytes()
    tiny_parts = raw_parts(tiny)
    assert {flag for _, flag, _ in tiny_parts} == {0}  # no JPEG here contains an aligned magic word
    assert tiny_parts[0] == (0, 0, 24 + 2 * 4)  # header record: IRHeader + 2 float labels, empty payload
    assert struct.unpack_from("<IfQQ2f", tiny, 8) == (2, 0.0, 0, 0, 241.0, 281.0)  # header.label stored as 0
    assert any(length % 4 for _, _, length in tiny_parts)  # unaligned lengths exist and were padded
    idx_lines = (recordio_dir / "faces_tiny.idx").read_text().splitlines()
    assert idx_lines[:2] == ["0\t0", "1\t40"]
    assert (recordio_dir / "property").read_text() == "40,112,112\n"
    assert read_property(recordio_dir / "property") == (40, 112, 112)

    split = raw_parts((recordio_dir / "split.rec").read_bytes())
    assert [flag for _, flag, _ in split] == [1, 2, 3] + [1, 2, 2, 3] + [1, 2, 2, 2, 3]
    assert [length for _, _, length in split][:3] == [32, 256, 12]  # 24 header + 8 data; magic word dropped
    for index in range(3):
        payload = split_payload(index)
        assert (len(payload), md5(payload)) == (
            recordio_manifest["split"][str(index)]["payload_len"],
            recordio_manifest["split"][str(index)]["payload_md5"],
        )


# ------------------------------------------------------------------------------------------------------------
# Writing byte-identical files


def test_writer_splits_magic_words_exactly_like_mxnet(recordio_dir, tmp_path):
    rec, idx = paths(tmp_path, "split")
    with RecordWriter(rec, idx) as writer:
        for index in range(3):
            writer.write(pack(IRHeader(0, float(index), index, 0), split_payload(index)), key=index)
    assert rec.read_bytes() == (recordio_dir / "split.rec").read_bytes()
    assert idx.read_bytes() == (recordio_dir / "split.idx").read_bytes()


@pytest.mark.parametrize("source", ["paths", "bytes"])
def test_write_insightface_reproduces_mxnet_faces_tiny(recordio_dir, tiny_samples, tmp_path, source):
    samples = (
        tiny_samples if source == "paths" else [(path.read_bytes(), label) for path, label in tiny_samples]
    )
    result = write_insightface(tmp_path / "faces_tiny", samples, image_size=(112, 112))
    assert (result["images"], result["num_classes"]) == (240, 40)
    for name in ("faces_tiny.rec", "faces_tiny.idx", "property"):
        assert (tmp_path / name).read_bytes() == (recordio_dir / name).read_bytes(), name


def test_write_insightface_orders_by_label(tiny_samples, tmp_path):
    shuffled = [tiny_samples[i] for i in np.random.default_rng(0).permutation(len(tiny_samples))]
    write_insightface(tmp_path / "train", shuffled)
    dataset = RecordDataset(tmp_path / "train.rec")
    assert list(dataset.labels) == sorted(label for _, label in tiny_samples)


@pytest.mark.parametrize("name", ["flat", "faces_tiny_multilabel"])
def test_record_writer_reproduces_other_mxnet_layouts(recordio_dir, tiny_samples, tmp_path, name):
    rec, idx = paths(tmp_path, name)
    with RecordWriter(rec, idx) as writer:
        if name == "flat":
            for key, (path, label) in enumerate(tiny_samples[:60]):
                writer.write(pack(IRHeader(0, label, key, 0), path.read_bytes()), key=key)
        else:
            write_multilabel_records(writer, tiny_samples)
    assert rec.read_bytes() == (recordio_dir / f"{name}.rec").read_bytes()
    assert idx.read_bytes() == (recordio_dir / f"{name}.idx").read_bytes()


def write_multilabel_records(writer: RecordWriter, samples) -> None:
    writer.write(pack(IRHeader(2, [241, 281], 0, 0), b""), key=0)
    for key, (path, label) in enumerate(samples, start=1):
        writer.write(pack(IRHeader(2, [label, key], key, 0), path.read_bytes()), key=key)
    for label in range(40):
        key = 241 + label
        writer.write(pack(IRHeader(2, [1 + 6 * label, 7 + 6 * label], key, 0), b""), key=key)


@pytest.mark.parametrize(
    "record",
    [
        MAGIC_BYTES,  # only the magic word: two empty parts
        MAGIC_BYTES + b"abc",  # magic at offset 0: empty first part
        b"abcd" + MAGIC_BYTES,  # magic at the end: empty last part
        b"ab" + MAGIC_BYTES + b"cd",  # unaligned: not split
        b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"x",  # consecutive magic words
        b"",
        b"x" * 1001,
    ],
)
def test_encode_and_read_back_edge_cases(tmp_path, record):
    encoded = encode_record(record)
    assert len(encoded) % 4 == 0
    assert MAGIC_BYTES.join(split_parts(record)) == record
    rec = tmp_path / "edge.rec"
    rec.write_bytes(encoded * 2)
    assert list(RecordReader(rec)) == [record, record]


def test_unaligned_magic_is_kept_in_one_part():
    assert split_parts(b"ab" + MAGIC_BYTES + b"cd") == [b"ab" + MAGIC_BYTES + b"cd"]
    assert split_parts(b"abcd" + MAGIC_BYTES + b"ef") == [b"abcd", b"ef"]


def test_round_trip_random_records_with_magic_words(tmp_path):
    rng = np.random.default_rng(1)
    records = []
    for _ in range(50):
        chunks = [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 5)))]
        records.append(MAGIC_BYTES.join(chunks))
    rec, idx = paths(tmp_path, "random")
    with RecordWriter(rec, idx) as writer:
        for key, record in enumerate(records):
            writer.write(record, key=1000 - key)  # keys need not be positions
    reader = RecordReader(rec, idx)
    assert [reader.read(1000 - key) for key in range(50)] == records
    assert list(reader) == records


def test_pack_and_unpack_headers():
    header, payload = unpack(pack(IRHeader(0, 3.0, 7, 9), b"jpeg"))
    assert (header, payload) == (IRHeader(0, 3.0, 7, 9), b"jpeg")
    header, payload = unpack(pack(IRHeader(99, [1.5, 2.0, 3.0], 4, 5), b"x"))  # flag follows the label
    assert (header, payload) == (IRHeader(3, (1.5, 2.0, 3.0), 4, 5), b"x")
    assert struct.unpack_from("<If", pack(IRHeader(0, [5.0], 0, 0), b"")) == (1, 0.0)
    with pytest.raises(PlscError, match="shorter than the 24-byte IRHeader"):
        unpack(b"short", "some.rec: key 3")


def test_writer_leaves_nothing_when_the_block_fails(tmp_path):
    rec, idx = paths(tmp_path, "failed")
    with pytest.raises(RuntimeError), RecordWriter(rec, idx) as writer:
        writer.write(b"a" * 10)
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_a_duplicate_key(tmp_path):
    with (
        pytest.raises(PlscError, match="key 3 written twice"),
        RecordWriter(*paths(tmp_path, "dup")) as writer,
    ):
        writer.write(b"a", key=3)
        writer.write(b"b", key=3)


# ------------------------------------------------------------------------------------------------------------
# RecordDataset


@pytest.mark.parametrize(
    "name, layout, count",
    [("faces_tiny", "insightface", 240), ("faces_tiny_multilabel", "insightface", 240), ("flat", "flat", 60)],
)
def test_record_dataset_layouts(recordio_dir, tiny_samples, name, layout, count):
    dataset = RecordDataset(recordio_dir / f"{name}.rec")  # the .idx beside it is found
    expected_labels = [label for _, label in tiny_samples[:count]]
    assert (dataset.layout, len(dataset), dataset.num_classes) == (layout, count, max(expected_labels) + 1)
    assert dataset.labels.dtype == np.int32 and list(dataset.labels) == expected_labels  # 4 bytes per image
    for index in (0, count // 2, count - 1):
        image, label = dataset[index]
        assert image.dtype == np.uint8 and image.shape == (112, 112, 3)
        assert np.array_equal(image, cv2.imread(str(tiny_samples[index][0]), cv2.IMREAD_COLOR))  # BGR
        assert label == expected_labels[index]
    with pytest.raises(IndexError):
        dataset[count]


def test_record_dataset_without_idx(recordio_dir, tmp_path):
    rec, _ = copy_rec(recordio_dir, "faces_tiny", tmp_path, with_idx=False)
    dataset = RecordDataset(rec)
    assert (dataset.layout, len(dataset), dataset.num_classes) == ("insightface", 240, 40)
    assert dataset[239][1] == 39


def _read_labels_in_worker(dataset_and_indices):
    dataset, indices = dataset_and_indices
    return os.getpid(), [(int(dataset[i][0].sum()), dataset[i][1]) for i in indices]


def test_record_dataset_works_in_forked_and_pickled_workers(recordio_dir):
    dataset = RecordDataset(recordio_dir / "faces_tiny.rec")
    expected = [(int(dataset[i][0].sum()), dataset[i][1]) for i in range(0, 240, 20)]  # parent opens first
    clone = pickle.loads(pickle.dumps(dataset))
    assert [(int(clone[i][0].sum()), clone[i][1]) for i in range(0, 240, 20)] == expected
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_read_labels_in_worker, [(dataset, range(0, 240, 20))] * 2)
    assert all(pid != os.getpid() and values == expected for pid, values in results)


def write_records(path: Path, payloads_and_labels) -> None:
    with RecordWriter(path, path.with_suffix(".idx")) as writer:
        for key, (payload, label) in enumerate(payloads_and_labels):
            writer.write(pack(IRHeader(0, label, key, 0), payload), key=key)


def test_undecodable_image_names_rec_and_key(tiny_samples, tmp_path):
    rec = tmp_path / "corrupt.rec"
    good = tiny_samples[0][0].read_bytes()
    # key 3: cut inside the scan data, which some OpenCV builds decode "successfully" with grey rows
    write_records(rec, [(good, 0), (good[:200], 0), (b"not an image", 1), (good[: len(good) * 2 // 3], 1)])
    dataset = RecordDataset(rec)
    assert dataset[0][0].shape == (112, 112, 3)
    for index in (1, 2, 3):
        with pytest.raises(PlscError, match=rf"corrupt\.rec: key {index}: .*not a decodable image"):
            dataset[index]


def test_non_integer_label_is_rejected(tiny_samples, tmp_path):
    rec = tmp_path / "labels.rec"
    write_records(rec, [(tiny_samples[0][0].read_bytes(), 1.5)])
    with pytest.raises(PlscError, match=r"labels\.rec: key 0: label 1\.5 is not"):
        RecordDataset(rec)


# ------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


@pytest.mark.parametrize("cut", [-3, -8, -2000])
def test_truncated_rec_is_reported_on_open(recordio_dir, tmp_path, cut):
    rec, idx = copy_rec(recordio_dir, "faces_tiny", tmp_path)
    truncate(rec, rec.stat().st_size + cut)
    for make in (lambda: RecordReader(rec, idx), lambda: RecordDataset(rec), lambda: list(RecordReader(rec))):
        with pytest.raises(PlscError) as error:
            make()
        message = str(error.value)
        assert str(rec) in message and "\n" not in message
        assert "truncated" in message or "past the end" in message or "not a record position" in message


def test_idx_offset_past_the_end(recordio_dir, tmp_path):
    rec, idx = copy_rec(recordio_dir, "flat", tmp_path)
    idx.write_text(idx.read_text() + f"60\t{rec.stat().st_size + 400}\n")
    with pytest.raises(
        PlscError,
        match=rf"{re.escape(str(idx))}: key 60 points at offset \d+, which is not a record position",
    ):
        RecordReader(rec, idx)


def test_idx_offset_inside_a_record(recordio_dir, tmp_path):
    rec, idx = copy_rec(recordio_dir, "flat", tmp_path)
    idx.write_text("0\t0\n1\t48\n2\t10336\n")  # only the last record is walked on open
    reader = RecordReader(rec, idx)
    with pytest.raises(PlscError, match=rf"{re.escape(str(rec))}: offset 48: bad magic"):
        reader.read(1)


def test_malformed_idx_line(recordio_dir, tmp_path):
    rec, idx = copy_rec(recordio_dir, "flat", tmp_path)
    idx.write_text("0\t0\n1 5152 extra\n")
    with pytest.raises(PlscError, match=rf"{re.escape(str(idx))}: line 2: expected 'key<TAB>offset'"):
        RecordReader(rec, idx)


@pytest.mark.parametrize("content", [b"garbage!" * 100, b"\x00" * 64, b"GIF89a" + bytes(58)])
def test_garbage_file_is_not_recordio(tmp_path, content):
    rec = tmp_path / "garbage.rec"
    rec.write_bytes(content)
    with pytest.raises(
        PlscError, match=rf"{re.escape(str(rec))}: offset 0: bad magic 0x[0-9a-f]{{8}}, not a RecordIO record"
    ):
        RecordDataset(rec)


def test_bad_magic_in_the_middle(recordio_dir, tmp_path):
    rec, idx = copy_rec(recordio_dir, "flat", tmp_path)
    data = bytearray(rec.read_bytes())
    offset = RecordReader(recordio_dir / "flat.rec", recordio_dir / "flat.idx").offset_of(5)
    data[offset : offset + 4] = b"XXXX"
    rec.write_bytes(bytes(data))
    with pytest.raises(PlscError, match=rf"{re.escape(str(rec))}: offset {offset}: bad magic"):
        RecordDataset(rec, idx)
    with pytest.raises(PlscError, match=rf"{re.escape(str(rec))}: offset {offset}: bad magic"):
        list(RecordReader(rec))


def test_missing_files(tmp_path):
    with pytest.raises(PlscError, match="no such RecordIO file"):
        RecordReader(tmp_path / "absent.rec")
    (tmp_path / "empty.rec").write_bytes(b"")
    with pytest.raises(PlscError, match="no such RecordIO index file"):
        RecordReader(tmp_path / "empty.rec", tmp_path / "absent.idx")
    with pytest.raises(PlscError, match="contains no records"):
        RecordDataset(tmp_path / "empty.rec")


# ------------------------------------------------------------------------------------------------------------
# rec_to_images / images_to_rec


def assert_extracted_like_manifest(output: Path, recordio_manifest: dict, tiny_dir: Path) -> None:
    expected = recordio_manifest["faces_tiny"]
    for key in range(1, 241):
        data = (output / "images" / f"{key:08d}.jpg").read_bytes()
        assert (len(data), md5(data)) == (
            expected[str(key)]["payload_len"],
            expected[str(key)]["payload_md5"],
        )
    assert (output / "label.txt").read_text() == (tiny_dir / "label.txt").read_text()
    assert not list(output.rglob("*.tmp"))


def test_rec_to_images_writes_payloads_verbatim(recordio_dir, recordio_manifest, tiny_dir, tmp_path):
    rec, idx = copy_rec(recordio_dir, "faces_tiny", tmp_path / "rec")
    shutil.copyfile(tiny_dir / "lfw_disjoint_100.bin", tmp_path / "rec" / "lfw.bin")
    summary = rec_to_images(rec, idx, tmp_path / "out", progress=False)
    assert (summary.images, summary.num_classes, summary.written, summary.skipped) == (240, 40, 240, 0)
    assert summary.copied == ["lfw.bin"]
    assert_extracted_like_manifest(tmp_path / "out", recordio_manifest, tiny_dir)
    assert (tmp_path / "out" / "lfw.bin").read_bytes() == (tiny_dir / "lfw_disjoint_100.bin").read_bytes()


def test_rec_to_images_flat_layout_numbers_from_one(recordio_dir, tiny_samples, tmp_path):
    rec_to_images(recordio_dir / "flat.rec", None, tmp_path, progress=False)
    lines = (tmp_path / "label.txt").read_text().splitlines()
    assert lines[0] == "images/00000001.jpg\t0" and lines[-1] == "images/00000060.jpg\t9"
    assert (tmp_path / "images" / "00000060.jpg").read_bytes() == tiny_samples[59][0].read_bytes()


def test_rec_to_images_rerun_completes_an_interrupted_run(recordio_dir, recordio_manifest, tiny_dir,
                                                          tmp_path):
    out = tmp_path / "out"
    rec_to_images(recordio_dir / "faces_tiny.rec", None, out, progress=False)
    images = out / "images"
    for key in (3, 100, 240):
        (images / f"{key:08d}.jpg").unlink()
    truncate(images / "00000050.jpg", 100)  # not one of ours: wrong size, so rewritten
    (images / ".00000007.jpg.12345.tmp").write_bytes(b"half an image")  # killed between write and rename
    (out / "label.txt").unlink()
    summary = rec_to_images(recordio_dir / "faces_tiny.rec", None, out, progress=False)
    assert (summary.written, summary.skipped) == (4, 236)
    assert_extracted_like_manifest(out, recordio_manifest, tiny_dir)


def test_rec_to_images_interrupted_leaves_no_partial_file(
    recordio_dir, recordio_manifest, tiny_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def replace_then_interrupt(source, target):
        calls.append(target)
        if len(calls) == 120:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(convert.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        rec_to_images(recordio_dir / "faces_tiny.rec", None, out, progress=False)
    monkeypatch.setattr(convert.os, "replace", real_replace)
    assert len(list((out / "images").iterdir())) == 119  # complete images only: no temp file, no label.txt
    assert not (out / "label.txt").exists()
    summary = rec_to_images(recordio_dir / "faces_tiny.rec", None, out, progress=False)
    assert (summary.written, summary.skipped) == (121, 119)
    assert_extracted_like_manifest(out, recordio_manifest, tiny_dir)


def test_rec_to_images_bad_input_creates_no_output(recordio_dir, tmp_path):
    rec, idx = copy_rec(recordio_dir, "faces_tiny", tmp_path)
    truncate(rec, rec.stat().st_size - 2000)
    with pytest.raises(PlscError, match=re.escape(str(rec))):
        rec_to_images(rec, idx, tmp_path / "out", progress=False)
    garbage = tmp_path / "garbage.rec"
    garbage.write_bytes(b"garbage!" * 10)
    with pytest.raises(PlscError, match=re.escape(str(garbage))):
        rec_to_images(garbage, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_rec_to_images_non_image_payload_names_the_key(tiny_samples, tmp_path):
    rec = tmp_path / "mixed.rec"
    write_records(rec, [(tiny_samples[0][0].read_bytes(), 0), (b"plain text, not an image", 0)])
    with pytest.raises(PlscError, match=r"mixed\.rec: key 1: payload of 24 bytes is not a JPEG"):
        rec_to_images(rec, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "label.txt").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_images_to_rec_round_trip(recordio_dir, tiny_dir, tiny_samples, tmp_path):
    summary = images_to_rec(tiny_dir, tiny_dir / "label.txt", tmp_path / "rec" / "train", progress=False)
    assert (summary.images, summary.num_classes, summary.copied) == (240, 40, ["lfw_disjoint_100.bin"])
    assert (tmp_path / "rec" / "train.rec").read_bytes() == (recordio_dir / "faces_tiny.rec").read_bytes()
    assert (tmp_path / "rec" / "property").read_text() == "40,112,112\n"
    rec_to_images(tmp_path / "rec" / "train.rec", None, tmp_path / "back", progress=False)
    assert (tmp_path / "back" / "label.txt").read_text() == (tiny_dir / "label.txt").read_text()
    for position, (path, _) in enumerate(tiny_samples):
        assert (tmp_path / "back" / "images" / f"{position + 1:08d}.jpg").read_bytes() == path.read_bytes()


def test_images_to_rec_bad_input_leaves_nothing(tiny_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_dir / "images", root / "images")
    label_file = root / "label.txt"
    label_file.write_text("images/00000001.jpg\t0\nimages/00000002.jpg\n")
    with pytest.raises(PlscError, match=rf"{re.escape(str(label_file))} line 2: expected"):
        images_to_rec(root, None, tmp_path / "out" / "train", progress=False)
    label_file.write_text("images/00000001.jpg\t0\nimages/missing.jpg\t1\n")
    with pytest.raises(PlscError, match=r"line 2: image not found: .*missing\.jpg"):
        images_to_rec(root, None, tmp_path / "out" / "train", progress=False)
    (root / "images" / "00000002.jpg").unlink()
    (root / "images" / "00000002.jpg").mkdir()  # listed, so it passes the check; fails once writing started
    label_file.write_text("images/00000001.jpg\t0\nimages/00000002.jpg\t1\n")
    with pytest.raises(PlscError, match=r"00000002\.jpg: cannot read image"):
        images_to_rec(root, None, tmp_path / "out" / "train", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
