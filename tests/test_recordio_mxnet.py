"""Cross-check plsc's RecordIO against the real mxnet 1.9.1: files written by one are read by the other.

mxnet needs numpy < 1.24, so this runs in its own environment (``tox -e mxnet-compat``) and is skipped
elsewhere. plsc.data.recordio imports no paddle, so plsc only has to be importable there.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    import mxnet  # noqa: F401
    from mxnet import recordio as mx_recordio
except Exception:  # ImportError, or mxnet failing against a too-new numpy
    mx_recordio = None

from plsc.data.recordio import (
    MAGIC_BYTES,
    IRHeader,
    RecordDataset,
    RecordReader,
    RecordWriter,
    pack,
    unpack,
    write_insightface,
)

pytestmark = pytest.mark.skipif(mx_recordio is None, reason="needs mxnet (tox -e mxnet-compat)")


def tricky_records() -> list[bytes]:
    """Lengths of every residue mod 4, and magic words aligned, unaligned, leading, trailing and repeated."""
    rng = np.random.default_rng(7)
    records = [b"", b"a", b"ab", b"abc", b"abcd", MAGIC_BYTES, MAGIC_BYTES * 3]
    records += [MAGIC_BYTES + b"xyz", b"wxyz" + MAGIC_BYTES, b"w" + MAGIC_BYTES + b"xyz", b"wx" + MAGIC_BYTES]
    for _ in range(40):
        chunks = [rng.bytes(int(rng.integers(0, 30))) for _ in range(int(rng.integers(1, 5)))]
        records.append(MAGIC_BYTES.join(chunks))
    return records


def write_with_mxnet(rec, idx, records, keys) -> None:
    writer = mx_recordio.MXIndexedRecordIO(str(idx), str(rec), "w")
    for key, record in zip(keys, records, strict=True):
        writer.write_idx(key, record)
    writer.close()


def test_plsc_reads_what_mxnet_writes(tmp_path):
    records = tricky_records()
    keys = [3 * position + 5 for position in range(len(records))]
    rec, idx = tmp_path / "mx.rec", tmp_path / "mx.idx"
    write_with_mxnet(rec, idx, records, keys)
    reader = RecordReader(rec, idx)
    assert list(reader.keys) == keys
    assert [reader.read(key) for key in keys] == records
    assert list(RecordReader(rec)) == records


def test_mxnet_reads_what_plsc_writes(tmp_path):
    records = tricky_records()
    rec, idx = tmp_path / "plsc.rec", tmp_path / "plsc.idx"
    with RecordWriter(rec, idx) as writer:
        for key, record in enumerate(records):
            writer.write(record, key=key)
    indexed = mx_recordio.MXIndexedRecordIO(str(idx), str(rec), "r")
    assert [indexed.read_idx(key) for key in range(len(records))] == records
    indexed.close()
    sequential = mx_recordio.MXRecordIO(str(rec), "r")
    assert [sequential.read() for _ in records] == records and sequential.read() is None
    sequential.close()


def test_files_are_byte_identical(tmp_path):
    records = tricky_records()
    write_with_mxnet(tmp_path / "mx.rec", tmp_path / "mx.idx", records, range(len(records)))
    with RecordWriter(tmp_path / "plsc.rec", tmp_path / "plsc.idx") as writer:
        for record in records:
            writer.write(record)
    assert (tmp_path / "plsc.rec").read_bytes() == (tmp_path / "mx.rec").read_bytes()
    assert (tmp_path / "plsc.idx").read_bytes() == (tmp_path / "mx.idx").read_bytes()


@pytest.mark.parametrize("label", [3.0, 0.5, [1.0, 2.0], [7.0, 8.0, 9.0, 10.5]])
def test_irheader_pack_and_unpack_agree(label):
    payload = b"\xff\xd8payload"
    mx_header = mx_recordio.IRHeader(0, label, 11, 12)
    ours = pack(IRHeader(0, label, 11, 12), payload)
    assert ours == mx_recordio.pack(mx_header, payload)
    header, data = unpack(ours)
    mx_unpacked, mx_data = mx_recordio.unpack(ours)
    assert data == mx_data == payload
    assert (header.flag, header.id, header.id2) == (mx_unpacked.flag, mx_unpacked.id, mx_unpacked.id2)
    assert np.allclose(np.atleast_1d(header.label), np.atleast_1d(mx_unpacked.label))


def test_insightface_layout_both_ways(tiny_dir, tmp_path):
    from plsc.data.folder import FolderDataset

    folder = FolderDataset(tiny_dir)
    samples = [(folder.image_path(i), int(label)) for i, label in enumerate(folder.labels)]
    write_insightface(tmp_path / "plsc" / "train", samples)
    mx_reader = mx_recordio.MXIndexedRecordIO(
        str(tmp_path / "plsc" / "train.idx"), str(tmp_path / "plsc" / "train.rec"), "r"
    )
    header0, _ = mx_recordio.unpack(mx_reader.read_idx(0))
    assert (header0.flag, list(header0.label)) == (2, [241.0, 281.0])
    for key in (1, 120, 240):
        header, payload = mx_recordio.unpack(mx_reader.read_idx(key))
        assert (header.label, payload) == (samples[key - 1][1], samples[key - 1][0].read_bytes())
    mx_reader.close()

    # the same layout written by mxnet, read back as a training dataset
    (tmp_path / "mx").mkdir()
    writer = mx_recordio.MXIndexedRecordIO(
        str(tmp_path / "mx" / "train.idx"), str(tmp_path / "mx" / "train.rec"), "w"
    )
    writer.write_idx(0, mx_recordio.pack(mx_recordio.IRHeader(2, [241, 281], 0, 0), b""))
    for key, (path, label) in enumerate(samples, start=1):
        writer.write_idx(key, mx_recordio.pack(mx_recordio.IRHeader(0, label, key, 0), path.read_bytes()))
    for label in range(40):
        record_label = [1 + 6 * label, 7 + 6 * label]
        writer.write_idx(
            241 + label, mx_recordio.pack(mx_recordio.IRHeader(2, record_label, 241 + label, 0), b"")
        )
    writer.close()
    dataset = RecordDataset(tmp_path / "mx" / "train.rec")
    assert (dataset.layout, len(dataset), dataset.num_classes) == ("insightface", 240, 40)
    assert list(dataset.labels) == [label for _, label in samples]
    assert (tmp_path / "mx" / "train.rec").read_bytes() == (tmp_path / "plsc" / "train.rec").read_bytes()


def test_im2rec_layout_past_float32_keys_both_ways(tiny_dir, tmp_path):
    """The layout arcface_torch documents for WebFace42M (mxnet's im2rec: images only, IRHeader (0, label,
    key, 0), keys in the .idx): plsc's read as MXFaceDataset reads it, and mxnet's with keys float32 cannot
    hold read by plsc, index built and then mapped."""
    from plsc.data.folder import FolderDataset

    folder = FolderDataset(tiny_dir)
    samples = [(folder.image_path(i), int(label)) for i, label in enumerate(folder.labels)][::7]
    write_insightface(tmp_path / "plsc" / "train", samples, layout="im2rec")
    mx_reader = mx_recordio.MXIndexedRecordIO(
        str(tmp_path / "plsc" / "train.idx"), str(tmp_path / "plsc" / "train.rec"), "r"
    )
    assert mx_recordio.unpack(mx_reader.read_idx(0))[0].flag == 0  # so MXFaceDataset takes every key
    assert list(mx_reader.keys) == list(range(len(samples)))
    for key in mx_reader.keys:
        header, payload = mx_recordio.unpack(mx_reader.read_idx(key))
        assert (header.flag, header.label, header.id, header.id2) == (0, samples[key][1], key, 0)
        assert payload == samples[key][0].read_bytes()
    mx_reader.close()

    (tmp_path / "mx").mkdir()
    keys = [2**26 + 7 - 2 * position for position in range(len(samples))]  # descending, none float32-exact
    writer = mx_recordio.MXIndexedRecordIO(
        str(tmp_path / "mx" / "train.idx"), str(tmp_path / "mx" / "train.rec"), "w"
    )
    for key, (path, label) in zip(keys, samples, strict=True):
        writer.write_idx(key, mx_recordio.pack(mx_recordio.IRHeader(0, label, key, 0), path.read_bytes()))
    writer.close()
    for _ in range(2):  # builds the label index, then maps it
        dataset = RecordDataset(tmp_path / "mx" / "train.rec")
        assert dataset.layout == "flat" and dataset.image_keys.tolist() == keys
        assert dataset.labels.tolist() == [label for _, label in samples]
        assert [dataset.encoded(i) for i in range(len(samples))] == [path.read_bytes() for path, _ in samples]
    assert dataset.index.path == tmp_path / "mx" / "train.plsc-index"
