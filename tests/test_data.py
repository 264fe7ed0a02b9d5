"""Training data: folder data set with injected faults, synthetic data, transforms, sampler, loader."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from plsc.config import DataConfig
from plsc.data import (
    DistributedShuffleSampler,
    EvalTransform,
    FolderDataset,
    SyntheticDataset,
    TrainTransform,
    build_dataset,
    build_train_loader,
    normalize_batch,
    read_image,
    transforms,
)
from plsc.data.folder import _is_truncated_jpeg, read_into_thread_buffer
from plsc.data.transforms import flip_draws, normalize_pixels
from plsc.errors import PlscError

SUBSET = 12  # images copied into each faulty data set: enough for every case, cheap to copy


def _tiny_lines(tiny_dir: Path, count: int) -> list[str]:
    return (tiny_dir / "label.txt").read_text().splitlines()[:count]


@pytest.fixture
def tiny_copy(tmp_path, tiny_dir) -> Path:
    """The first SUBSET samples of data/tiny in a writable folder."""
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    lines = _tiny_lines(tiny_dir, SUBSET)
    for line in lines:
        rel = line.split("\t")[0]
        shutil.copyfile(tiny_dir / rel, root / rel)
    (root / "label.txt").write_text("\n".join(lines) + "\n")
    return root


def _replace_line(root: Path, line_number: int, text: str) -> None:
    lines = (root / "label.txt").read_text().splitlines()
    lines[line_number - 1] = text
    (root / "label.txt").write_text("\n".join(lines) + "\n")


def _assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# --- folder data set: the bundled data -------------------------------------------------------------------


def test_tiny_folder_dataset_matches_label_file(tiny_dir):
    dataset = FolderDataset(tiny_dir)
    assert len(dataset) == 240
    assert dataset.num_classes == 40
    assert dataset.labels.dtype == np.int64
    assert np.array_equal(np.bincount(dataset.labels), np.full(40, 6))
    image, label = dataset[7]
    assert image.dtype == np.uint8 and image.shape == (112, 112, 3)
    assert label == 1 and isinstance(label, int)
    assert np.array_equal(image, cv2.imread(str(tiny_dir / "images" / "00000008.jpg"), cv2.IMREAD_COLOR))
    assert np.array_equal(dataset[-1][0], dataset[239][0])
    with pytest.raises(IndexError):
        dataset[240]


# --- folder data set: strict mode faults -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("images/00000003.jpg", "got 1 fields"),
        ("images/00000003.jpg\t0\t7", "got 3 fields"),
        ("images/00000003.jpg\tzero", "'zero' is not a non-negative integer"),
        ("images/00000003.jpg\t-1", "'-1' is not a non-negative integer"),
        ("images/00000003.jpg\t1.5", "'1.5' is not a non-negative integer"),
    ],
)
def test_bad_line_names_label_file_and_line(tiny_copy, bad_line, expected):
    _replace_line(tiny_copy, 3, bad_line)
    with pytest.raises(PlscError) as error:
        FolderDataset(tiny_copy)
    message = _assert_one_line(error)
    assert str(tiny_copy / "label.txt") in message
    assert "line 3:" in message and expected in message


def test_missing_image_names_line_and_path(tiny_copy):
    (tiny_copy / "images" / "00000005.jpg").unlink()
    (tiny_copy / "images" / "00000009.jpg").unlink()
    with pytest.raises(PlscError) as error:
        FolderDataset(tiny_copy)
    message = _assert_one_line(error)
    assert "label.txt line 5: image not found" in message
    assert "00000005.jpg" in message and "1 more missing" in message


def test_missing_label_file_and_root(tmp_path):
    with pytest.raises(PlscError, match="label file not found"):
        FolderDataset(tmp_path)
    with pytest.raises(PlscError, match="not a directory"):
        FolderDataset(tmp_path / "nowhere")


def test_label_file_without_samples(tmp_path):
    (tmp_path / "label.txt").write_text("# only a comment\n\n")
    with pytest.raises(PlscError, match="no usable samples"):
        FolderDataset(tmp_path)


def _corrupt(path: Path, kind: str) -> None:
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("this is not a JPEG\n")
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
def test_corrupt_image_fails_when_read_naming_the_file(tiny_copy, kind):
    _corrupt(tiny_copy / "images" / "00000004.jpg", kind)
    dataset = FolderDataset(tiny_copy)  # existence is checked up front, decodability only when read
    assert len(dataset) == SUBSET
    dataset[2]
    with pytest.raises(PlscError) as error:
        dataset[3]
    message = _assert_one_line(error)
    assert "cannot decode image" in message and str(tiny_copy / "images" / "00000004.jpg") in message


def test_truncated_jpeg_is_detected_without_relying_on_opencv(tiny_dir):
    raw = (tiny_dir / "images" / "00000001.jpg").read_bytes()
    assert not _is_truncated_jpeg(raw)
    assert all(_is_truncated_jpeg(raw[:cut]) for cut in range(len(raw) // 3, len(raw) - 1, 97))
    assert not _is_truncated_jpeg(b"\x89PNG not a jpeg")
    # bytes after the end-of-image marker (some cameras append data) do not make a whole image truncated
    assert not _is_truncated_jpeg(raw + b"trailing data")
    assert _is_truncated_jpeg(raw[: len(raw) // 2] + b"\xff\xd9"[:1])


@pytest.mark.parametrize("size", [0, 1, 2**16 - 1, 2**16, 2**16 + 1, 2**17, 300_001])
def test_files_are_read_whole_whatever_their_size_against_the_read_buffer(tmp_path, size):
    content = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "file").write_bytes(content)
    assert bytes(read_into_thread_buffer(tmp_path / "file")) == content
    # again, with the buffer as the first read left it
    assert bytes(read_into_thread_buffer(tmp_path / "file")) == content


def test_a_large_image_reads_like_opencvs_imread(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (700, 500, 3), dtype=np.uint8)  # ~600 KB as JPEG
    path = tmp_path / "large.jpg"
    assert cv2.imwrite(str(path), noise) and path.stat().st_size > 4 * 2**16
    np.testing.assert_array_equal(read_image(path), cv2.imread(str(path)))
    with pytest.raises(PlscError, match=r"^cannot read image .*: Is a directory$"):
        read_image(tmp_path)


# --- folder data set: skip mode ---------------------------------------------------------------------------


def test_skip_mode_counts_bad_lines_and_missing_images(tiny_copy):
    _replace_line(tiny_copy, 2, "images/00000002.jpg")
    _replace_line(tiny_copy, 4, "images/00000004.jpg\tx")
    (tiny_copy / "images" / "00000007.jpg").unlink()
    dataset = FolderDataset(tiny_copy, skip_bad=True)
    assert len(dataset) == SUBSET - 3
    assert dataset.skipped == 3
    assert [reason.split(":")[:2] for reason in dataset.skipped_reasons] == [
        ["label.txt", "2"],
        ["label.txt", "4"],
        ["label.txt", "7"],
    ]
    assert "image not found" in dataset.skipped_reasons[2]
    kept = ["00000001", "00000003", "00000005", "00000006", "00000008"]
    assert [dataset.relative_path(i)[7:15] for i in range(5)] == kept


def test_skip_mode_substitutes_the_next_readable_image(tiny_copy):
    _corrupt(tiny_copy / "images" / "00000004.jpg", "text")
    _corrupt(tiny_copy / "images" / "00000005.jpg", "truncated")
    dataset = FolderDataset(tiny_copy, skip_bad=True)
    image, label = dataset[3]
    expected_image, expected_label = dataset[5]
    assert np.array_equal(image, expected_image) and label == expected_label
    assert dataset.unreadable_indices == {3, 4}
    assert len(dataset) == SUBSET and dataset.skipped == 0  # nothing was dropped: batches stay full


def test_skip_mode_gives_up_when_everything_is_unreadable(tiny_copy):
    for path in (tiny_copy / "images").iterdir():
        _corrupt(path, "text")
    dataset = FolderDataset(tiny_copy, skip_bad=True)
    with pytest.raises(PlscError, match="consecutive images .* are unreadable"):
        dataset[0]


def test_verify_images_drops_or_reports_undecodable_files(tiny_copy):
    _corrupt(tiny_copy / "images" / "00000006.jpg", "truncated")
    dataset = FolderDataset(tiny_copy, skip_bad=True, verify_images=True)
    assert len(dataset) == SUBSET - 1 and dataset.skipped == 1
    assert dataset.skipped_reasons == ["cannot decode image images/00000006.jpg"]
    with pytest.raises(PlscError, match="cannot decode image .*00000006.jpg"):
        FolderDataset(tiny_copy, verify_images=True)


# --- folder data set: label file syntax -------------------------------------------------------------------


def test_spaces_comments_and_blank_lines_parse_like_tabs(tiny_copy):
    reference = FolderDataset(tiny_copy)
    lines = (tiny_copy / "label.txt").read_text().splitlines()
    messy = ["# written by hand", ""]
    for number, line in enumerate(lines):
        path, label = line.split("\t")
        messy.append(f"{path}   {label}  " if number % 2 else f"  {path} \t {label}")
        messy.append("   # a comment between samples" if number == 3 else "")
    (tiny_copy / "messy.txt").write_text("\n".join(messy))
    dataset = FolderDataset(tiny_copy, label_file="messy.txt")
    assert np.array_equal(dataset.labels, reference.labels)
    assert [dataset.relative_path(i) for i in range(len(dataset))] == [
        reference.relative_path(i) for i in range(len(reference))
    ]


def test_tab_separated_path_may_contain_spaces_and_unicode(tiny_copy):
    shutil.copyfile(tiny_copy / "images" / "00000001.jpg", tiny_copy / "images" / "Zoë Ball 1.jpg")
    (tiny_copy / "label.txt").write_text("images/Zoë Ball 1.jpg\t3\n")
    dataset = FolderDataset(tiny_copy)
    assert dataset.num_classes == 4
    assert np.array_equal(dataset[0][0], read_image(tiny_copy / "images" / "00000001.jpg"))


# --- configuration dispatch and num_classes --------------------------------------------------------------


def test_build_dataset_checks_configured_num_classes(tiny_copy):
    dataset = build_dataset(DataConfig(source="folder", root=str(tiny_copy), num_classes=10))
    assert dataset.num_classes == 10 and int(dataset.labels.max()) == 1
    with pytest.raises(PlscError, match="num_classes is 1 but the folder data has label 1; .* >= 2"):
        build_dataset(DataConfig(source="folder", root=str(tiny_copy), num_classes=1))


@pytest.mark.parametrize("count, classes, dtype",
                         [(2_500_000, 1000, np.int32), (3_000_000, 200_000, np.int64), (5, 10**9, np.int64),
                          (1, 0, np.int32)])
def test_count_distinct_labels_equals_a_set(count, classes, dtype):
    """Both ways (marks per class over several slices; a sort where classes outnumber the labels) against
    Python's set; some classes are left out so that the count is not simply the largest label + 1."""
    from plsc.data.loader import count_distinct

    labels = np.random.default_rng(count).integers(0, classes + 1, count).astype(dtype)
    labels[labels % 7 == 3] = 0
    assert count_distinct(labels, int(labels.max())) == len(set(labels.tolist()))


def test_build_dataset_synthetic_and_rec(monkeypatch, tmp_path):
    config = DataConfig(source="synthetic", num_classes=1000, synthetic_samples=50, image_size=32)
    dataset = build_dataset(config, seed=5)
    assert isinstance(dataset, SyntheticDataset) and len(dataset) == 50 and dataset.num_classes == 1000
    with pytest.raises(PlscError, match="num_classes must be set"):
        build_dataset(DataConfig(source="synthetic"))

    calls = []

    class FakeRecordDataset:
        def __init__(self, rec_path, idx_path=None):
            calls.append((rec_path, idx_path))
            self.labels = np.array([0, 2], dtype=np.int64)
            self.num_classes = 3

    fake_module = types.ModuleType("plsc.data.recordio")
    fake_module.RecordDataset = FakeRecordDataset
    monkeypatch.setitem(sys.modules, "plsc.data.recordio", fake_module)
    (tmp_path / "train.idx").write_text("")
    dataset = build_dataset(DataConfig(source="rec", root=str(tmp_path)))
    assert calls == [(str(tmp_path / "train.rec"), str(tmp_path / "train.idx"))]
    assert dataset.num_classes == 3


# --- synthetic data ---------------------------------------------------------------------------------------


def test_synthetic_dataset_is_deterministic_and_bounded():
    first, again, other = (SyntheticDataset(64, 10_000_000, 24, seed) for seed in (1, 1, 2))
    image, label = first[17]
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert np.array_equal(image, again[17][0]) and label == again[17][1]
    assert not np.array_equal(image, other[17][0])
    assert first.labels.dtype == np.int64 and first.labels.max() < 10_000_000
    assert first.num_classes == 10_000_000 and len(first) == 64
    with pytest.raises(PlscError, match="num_classes must be a positive integer"):
        SyntheticDataset(10, 0, 24)


# --- transforms -------------------------------------------------------------------------------------------


def _reference(image_bgr: np.ndarray, flip: bool) -> np.ndarray:
    """Independent float64 computation, HWC RGB."""
    rgb = image_bgr[:, :, [2, 1, 0]].astype(np.float64)
    if flip:
        rgb = rgb[:, list(range(rgb.shape[1] - 1, -1, -1)), :]
    return (rgb / 255.0 - 0.5) / 0.5


@pytest.fixture
def face(tiny_dir) -> np.ndarray:
    return read_image(tiny_dir / "images" / "00000001.jpg")


@pytest.mark.parametrize("flipped", [True, False])
def test_train_transform_math(face, flipped):
    nchw = TrainTransform(112, "NCHW")(face, flipped)
    nhwc = TrainTransform(112, "NHWC")(face, flipped)
    expected = _reference(face, flipped)
    assert nchw.dtype == np.float32 and nchw.shape == (3, 112, 112) and nchw.flags.c_contiguous
    assert nhwc.dtype == np.float32 and nhwc.shape == (112, 112, 3) and nhwc.flags.c_contiguous
    np.testing.assert_allclose(nhwc, expected, atol=1e-6)
    np.testing.assert_array_equal(nchw.transpose(1, 2, 0), nhwc)


class _AllocatingOpenCV:
    """cv2 as a build whose split and cvtColor return new arrays instead of filling the given ones."""

    def __getattr__(self, name):
        return getattr(cv2, name)

    def split(self, image, planes=None):
        return cv2.split(image)

    def cvtColor(self, image, code, dst=None):  # noqa: N802 (OpenCV's name)
        return cv2.cvtColor(image, code)


def test_whether_opencv_fills_given_arrays_is_probed(monkeypatch):
    assert transforms._opencv_writes_into_given_arrays()  # this OpenCV: the fast path
    monkeypatch.setattr(transforms, "cv2", _AllocatingOpenCV())
    assert not transforms._opencv_writes_into_given_arrays()


@pytest.mark.parametrize("opencv_fills_given_arrays", [True, False])
@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("flipped", [True, False])
def test_pixels_written_into_a_batch_slot_equal_numpy_indexing(face, data_format, flipped,
                                                                opencv_fills_given_arrays, monkeypatch):
    # not a copy of the slot: the transform must write the batch's own memory, with either kind of OpenCV
    if not opencv_fills_given_arrays:
        monkeypatch.setattr(transforms, "cv2", _AllocatingOpenCV())
        monkeypatch.setattr(transforms, "_WRITES_IN_PLACE", False)
    batch = np.zeros((3, *TrainTransform(112, data_format).pixel_shape), dtype=np.uint8)
    TrainTransform(112, data_format).write_pixels(batch[1], face, flipped)
    rgb = face[:, ::-1, [2, 1, 0]] if flipped else face[:, :, [2, 1, 0]]
    np.testing.assert_array_equal(batch[1], rgb.transpose(2, 0, 1) if data_format == "NCHW" else rgb)
    assert not batch[0].any() and not batch[2].any()


def test_eval_transform_and_no_flip_training_are_deterministic(face):
    expected = _reference(face, flip=False).transpose(2, 0, 1)
    np.testing.assert_allclose(EvalTransform(112)(face), expected, atol=1e-6)
    np.testing.assert_allclose(TrainTransform(112, flip=False)(face), expected, atol=1e-6)
    np.testing.assert_allclose(TrainTransform(112, flip=False)(face, True), expected, atol=1e-6)


def test_transform_resizes_and_validates():
    flat = np.full((150, 130, 3), (10, 20, 30), dtype=np.uint8)
    out = EvalTransform(112, "NHWC")(flat)
    assert out.shape == (112, 112, 3)
    np.testing.assert_allclose(out[50, 50], np.array([30, 20, 10]) / 127.5 - 1, atol=1e-6)
    assert EvalTransform(200)(flat).shape == (3, 200, 200)
    with pytest.raises(PlscError, match="data_format must be one of NCHW, NHWC"):
        EvalTransform(112, "CHW")
    with pytest.raises(PlscError, match="expected a uint8 HxWx3 BGR image"):
        EvalTransform(112)(flat.astype(np.float32))


def test_flip_decisions_are_seeded_per_sample_and_balanced():
    draws = flip_draws(7, 2, range(10_000))
    assert draws.dtype == bool and draws.shape == (10_000,)
    # per sample: the same draw alone, in any batch, in any order
    assert [bool(flip_draws(7, 2, [index])[0]) for index in range(50)] == draws[:50].tolist()
    assert np.array_equal(flip_draws(7, 2, [9_999, 3, 500]), draws[[9_999, 3, 500]])
    # fair and unrelated across seeds, epochs and neighbouring indices (binomial sd of 10,000 draws: 50)
    assert 4_800 < draws.sum() < 5_200
    for other in (flip_draws(7, 3, range(10_000)), flip_draws(8, 2, range(10_000)), draws[1:]):
        assert 0.48 < np.mean(draws[: len(other)] == other) < 0.52


# --- sampler ----------------------------------------------------------------------------------------------


def _epoch(sampler: DistributedShuffleSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_shares_are_disjoint_equal_and_cover_full_global_batches():
    num_samples, batch, world = 103, 4, 3
    samplers = [DistributedShuffleSampler(num_samples, batch, rank, world, seed=11) for rank in range(world)]
    per_rank = [_epoch(sampler, 0) for sampler in samplers]
    steps = num_samples // (world * batch)
    assert all(
        len(batches) == steps == len(sampler) for batches, sampler in zip(per_rank, samplers, strict=True)
    )
    assert all(len(b) == batch for batches in per_rank for b in batches)
    everything = [i for batches in per_rank for b in batches for i in b]
    assert len(everything) == len(set(everything)) == world * steps * batch
    assert set(everything) <= set(range(num_samples))
    # a global step holds the same samples as one process with the global batch size would
    single = _epoch(DistributedShuffleSampler(num_samples, batch * world, seed=11), 0)
    assert [sorted(sum((per_rank[r][s] for r in range(world)), [])) for s in range(steps)] == [
        sorted(b) for b in single
    ]


def test_sampler_order_depends_on_seed_and_epoch_only():
    first, twin, other_seed = (DistributedShuffleSampler(50, 5, seed=seed) for seed in (3, 3, 4))
    assert _epoch(first, 1) == _epoch(twin, 1)
    assert _epoch(first, 1) != _epoch(first, 2)
    assert _epoch(first, 1) != _epoch(other_seed, 1)
    full = _epoch(first, 4)
    first.set_epoch(4, start_batch=3)
    assert list(first) == full[3:] and len(first) == len(full) - 3


@pytest.mark.parametrize("num_samples, drop_last", [(103, True), (96, True), (103, False)])
def test_sampler_order_is_the_documented_slice_of_the_permutation(num_samples, drop_last):
    """The order a resumed run relies on, from a direct loop: step g, rank r takes the permutation's
    entries g*W*B + r*B ... + B - 1, wrapping around past its end when padding."""
    batch, world, seed, epoch = 4, 3, 11, 2
    permutation = np.random.default_rng((seed, epoch)).permutation(num_samples).tolist()
    steps = num_samples // (world * batch) if drop_last else -(-num_samples // (world * batch))
    for rank in range(world):
        sampler = DistributedShuffleSampler(num_samples, batch, rank, world, seed=seed, drop_last=drop_last)
        first = [step * world * batch + rank * batch for step in range(steps)]
        expected = [[permutation[(start + i) % num_samples] for i in range(batch)] for start in first]
        assert _epoch(sampler, epoch) == expected


def test_sampler_without_drop_last_pads_and_validates():
    sampler = DistributedShuffleSampler(10, 4, rank=1, world_size=2, drop_last=False)
    batches = _epoch(sampler, 0)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    both = batches + _epoch(DistributedShuffleSampler(10, 4, rank=0, world_size=2, drop_last=False), 0)
    assert set(i for b in both for i in b) == set(range(10))
    with pytest.raises(PlscError, match="fewer than one global batch"):
        DistributedShuffleSampler(7, 4, world_size=2)
    with pytest.raises(PlscError, match="rank must be in"):
        DistributedShuffleSampler(70, 4, rank=2, world_size=2)


# --- loader -----------------------------------------------------------------------------------------------


def _all_batches(loader, sampler, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    sampler.set_epoch(epoch)
    return [(images.numpy(), labels.numpy()) for images, labels in loader]


def test_loader_batches_match_sampler_and_transform(tiny_dir):
    dataset = FolderDataset(tiny_dir)
    loader, sampler = build_train_loader(
        dataset, batch_size=16, image_size=56, data_format="NHWC", seed=9, rank=1, world_size=2
    )
    batches = _all_batches(loader, sampler, 3)
    indices = sampler.rank_batches()
    assert len(batches) == 240 // 32 == len(indices)
    images, labels = batches[2]
    assert images.dtype == np.uint8 and images.shape == (16, 56, 56, 3)
    assert labels.dtype == np.int64 and labels.shape == (16,)
    assert np.array_equal(labels, dataset.labels[indices[2]])
    # the model's input (normalised on the tensor) is bit-identical to the per-image float transform
    model_input = normalize_batch(paddle.to_tensor(images)).numpy()
    transform = TrainTransform(56, "NHWC")
    for row in (0, 5, 15):
        index = int(indices[2][row])
        expected = transform(dataset[index][0], bool(flip_draws(9, 3, [index])[0]))
        assert expected.dtype == np.float32
        np.testing.assert_array_equal(model_input[row], expected)


def test_normalize_batch_equals_the_numpy_formula_for_every_pixel_value():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 4, 8, 8)
    expected = (pixels.astype(np.float64) / 255.0 - 0.5) / 0.5
    normalised = normalize_batch(paddle.to_tensor(pixels)).numpy()
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(normalised, expected, rtol=0, atol=2e-7)
    np.testing.assert_array_equal(normalised, normalize_pixels(pixels))


def test_normalize_batch_copies_a_host_batch_to_the_accelerator_first(monkeypatch):
    # no accelerator here: the device query and the copy are stand-ins that record what they were asked
    pixels = paddle.to_tensor(np.arange(12, dtype=np.uint8).reshape(1, 3, 2, 2))
    copies = []

    def copy_to(data, place=None):
        copies.append(place)
        return data

    monkeypatch.setattr(paddle.device, "get_device", lambda: "gpu:0")
    monkeypatch.setattr(paddle, "to_tensor", copy_to)
    normalised = normalize_batch(pixels)
    assert copies == ["gpu:0"]
    np.testing.assert_array_equal(normalised.numpy(), normalize_pixels(pixels.numpy()))
    monkeypatch.setattr(paddle.device, "get_device", lambda: "cpu")
    normalize_batch(pixels)
    assert copies == ["gpu:0"]  # on the CPU the batch is used where it is


def test_loader_is_identical_with_and_without_workers(tiny_dir):
    dataset = FolderDataset(tiny_dir)
    results = {}
    for workers in (0, 3):  # 3 workers: 6 slots for 10 batches, so slots are reused within an epoch
        loader, sampler = build_train_loader(
            dataset, batch_size=24, image_size=32, data_format="NCHW", num_workers=workers, seed=1
        )
        results[workers] = [_all_batches(loader, sampler, epoch) for epoch in (0, 1)]
    for epoch_0, epoch_2 in zip(results[0], results[3], strict=True):
        assert len(epoch_0) == len(epoch_2) == 10
        for (images_0, labels_0), (images_2, labels_2) in zip(epoch_0, epoch_2, strict=True):
            np.testing.assert_array_equal(images_0, images_2)
            np.testing.assert_array_equal(labels_0, labels_2)
    assert results[0][0][0][0].shape == (24, 3, 32, 32)
    assert not np.array_equal(results[0][0][0][1], results[0][1][0][1])  # epochs are shuffled differently


def _in_process_batches(dataset, epoch: int, **settings) -> list[np.ndarray]:
    """The epoch's pixel batches straight from TrainBatches, in this process: the reference."""
    loader, sampler = build_train_loader(dataset, num_workers=0, **settings)
    sampler.set_epoch(epoch)
    return [loader.batches[(epoch, batch)][0] for batch in sampler]


def test_an_epoch_left_early_does_not_disturb_the_next(tiny_dir):
    # the abandoned epoch's batches still in flight must not land in the next epoch's slots
    dataset = FolderDataset(tiny_dir)
    settings = dict(batch_size=24, image_size=32, seed=4)
    loader, sampler = build_train_loader(dataset, num_workers=2, **settings)
    try:
        sampler.set_epoch(0)
        for step, _ in enumerate(loader):
            if step == 1:
                break
        sampler.set_epoch(1)
        got = [images.numpy() for images, _ in loader]
    finally:
        loader.close()
    expected = _in_process_batches(dataset, 1, **settings)
    assert len(got) == len(expected) == 10
    for images, reference in zip(got, expected, strict=True):
        np.testing.assert_array_equal(images, reference)


def test_batches_kept_by_the_caller_stay_intact(tiny_dir):
    # list(loader) keeps every batch: at most (slots - workers) are lent, the rest are copies, and no slot is
    # built into while a kept tensor still uses it
    dataset = FolderDataset(tiny_dir)
    settings = dict(batch_size=24, image_size=32, seed=6)
    loader, sampler = build_train_loader(dataset, num_workers=2, **settings)
    try:
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            kept = list(loader)
            expected = _in_process_batches(dataset, epoch, **settings)
            assert len(kept) == len(expected) == 10
            for (images, _), reference in zip(kept, expected, strict=True):
                np.testing.assert_array_equal(images.numpy(), reference)
    finally:
        loader.close()


def test_workers_are_forked_with_opencvs_pool_at_one_thread_and_the_parents_count_comes_back(tiny_dir,
                                                                                          monkeypatch):
    """A worker forked while OpenCV's pool threads wait can hang in its first pool reconfiguration
    (plsc.data.workers._opencv_pool_stopped); each fork happens with the pool at one thread instead."""
    import multiprocessing.context

    at_fork = []
    start = multiprocessing.context.ForkProcess.start
    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start",
                        lambda process: (at_fork.append(cv2.getNumThreads()), start(process))[1])
    threads = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        loader, _ = build_train_loader(FolderDataset(tiny_dir), batch_size=24, image_size=32, num_workers=2)
        try:
            images, _ = next(iter(loader))
            assert images.shape[0] == 24 and at_fork == [1, 1]
            assert cv2.getNumThreads() == 3
        finally:
            loader.close()
    finally:
        cv2.setNumThreads(threads)


def test_a_lent_batch_is_the_slots_memory_and_its_slot_returns_when_dropped(tiny_dir):
    loader, sampler = build_train_loader(FolderDataset(tiny_dir), batch_size=24, image_size=32, num_workers=2)
    try:
        batches = iter(loader)
        images, _ = next(batches)
        slots = len(loader._images)
        expected = images.numpy().copy()
        next(batches)  # built while `images` is kept: not in its slot
        np.testing.assert_array_equal(images.numpy(), expected)
        while next(batches, None) is not None:  # each batch dropped at once: its slot comes back every time
            pass
        held = set(range(slots)) - set(loader._free_slots)  # the epoch is over: only `images` may hold one
        if int(paddle.__version__.split(".")[0]) >= 3:  # from_dlpack wraps the slot's memory
            (slot,) = held
            loader._images[slot] = 7
            np.testing.assert_array_equal(images.numpy(), np.full_like(expected, 7))
        else:  # Paddle 2.6's from_dlpack copies, and the slot was free at once: lending costs a copy there
            assert held == set()
        del images
        assert sorted(loader._free_slots) == list(range(slots))
    finally:
        loader.close()


def test_a_batch_kept_past_close_stays_valid_and_its_slot_is_not_taken_back(tiny_dir):
    settings = dict(batch_size=24, image_size=32, seed=2)
    loader, sampler = build_train_loader(FolderDataset(tiny_dir), num_workers=2, **settings)
    try:
        images, _ = next(iter(loader))
        expected = _in_process_batches(FolderDataset(tiny_dir), 0, **settings)
        loader.close()  # the workers and their mapping go; the kept batch keeps its memory
        got = [batch.numpy() for batch, _ in loader]  # new workers, new slots
        np.testing.assert_array_equal(images.numpy(), expected[0])
        del images  # a slot of the old mapping: not put among the new ones
        assert sorted(loader._free_slots) == list(range(len(loader._images)))
        for batch, reference in zip(got, expected, strict=True):
            np.testing.assert_array_equal(batch, reference)
    finally:
        loader.close()


def test_a_new_iteration_ends_one_still_held(tiny_dir):
    dataset = FolderDataset(tiny_dir)
    settings = dict(batch_size=24, image_size=32, seed=5)
    loader, sampler = build_train_loader(dataset, num_workers=2, **settings)
    try:
        held = iter(loader)
        next(held)
        got = [images.numpy() for images, _ in loader]
        assert list(held) == []  # ended, not interleaved with the new one
    finally:
        loader.close()
    expected = _in_process_batches(dataset, 0, **settings)
    assert len(got) == len(expected)
    for images, reference in zip(got, expected, strict=True):
        np.testing.assert_array_equal(images, reference)


class _FailingAt:
    """A data set whose sample ``bad`` raises: a PlscError (an unreadable image) or a bug."""

    def __init__(self, dataset, bad: int, error: Exception):
        self.dataset, self.bad, self.error = dataset, bad, error
        self.labels, self.num_classes = dataset.labels, dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index == self.bad:
            raise self.error
        return self.dataset[index]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_workers_plsc_error_is_raised_with_its_one_line_message(tiny_dir, workers):
    dataset = _FailingAt(FolderDataset(tiny_dir), 7, PlscError("cannot decode image x.jpg: corrupt"))
    loader, sampler = build_train_loader(dataset, batch_size=24, image_size=32, num_workers=workers)
    with pytest.raises(PlscError, match=r"^cannot decode image x.jpg: corrupt$"):
        list(loader)
    loader.close()


def test_a_workers_bug_is_raised_with_its_traceback(tiny_dir):
    dataset = _FailingAt(FolderDataset(tiny_dir), 7, ZeroDivisionError("division by zero"))
    loader, _ = build_train_loader(dataset, batch_size=24, image_size=32, num_workers=2)
    with pytest.raises(RuntimeError, match=r"(?s)a data loader worker failed:.*Traceback.*ZeroDivisionError"):
        list(loader)
    loader.close()


@pytest.mark.parametrize("send_to_it", [False, True])
def test_a_killed_worker_is_reported_not_waited_for(tiny_dir, send_to_it):
    import os
    import signal

    loader, sampler = build_train_loader(FolderDataset(tiny_dir), batch_size=24, image_size=32, num_workers=2)
    batches = iter(loader)
    next(batches)
    os.kill(loader._workers[1].pid, signal.SIGKILL)
    died = r"data loader worker plsc-loader-1 exited unexpectedly \(exit code -9\)"
    with pytest.raises(PlscError, match=died):
        if send_to_it:  # its next task meets a broken pipe (the loop below meets it only now and then)
            loader._workers[1].join(timeout=60)
            loader._send(1, (0, (0, [0])))
        else:  # the reply it owes never comes
            for _ in batches:
                pass
    assert loader._workers == []  # closed: the other worker is stopped too


EXIT_WITH_WORKERS_RUNNING = """
import sys
from plsc.data import FolderDataset, build_train_loader
loader, sampler = build_train_loader(FolderDataset(sys.argv[1]), batch_size=24, image_size=32, num_workers=2)
batches = iter(loader)
next(batches)
print("done")
"""


def test_a_process_that_exits_with_workers_running_exits_cleanly(tiny_dir):
    # multiprocessing terminates the workers at exit; Paddle's inherited SIGTERM handler must not report it
    import subprocess

    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_WORKERS_RUNNING, str(tiny_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "done\n" and "FatalError" not in proc.stderr
