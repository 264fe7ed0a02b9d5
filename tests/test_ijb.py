"""IJB 1:1 verification (plsc.eval.ijb, plsc eval --ijb) against a reference pipeline written here from the
protocol of insightface's recognition/arcface_torch/eval_ijbc.py: plain loops per face, per template, per
media, and a ROC counted threshold by threshold, on a small synthetic IJB layout (faces of a few subjects
pasted into small images with random similarity transforms, their five landmarks, templates sharing media).

The ROC reader is also checked against the example of sklearn's roc_curve documentation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from plsc import cli
from plsc.errors import PlscError
from plsc.eval import ijb
from plsc.faces.align import ARCFACE_TEMPLATE, align_face

SUBJECTS = 10
TEMPLATES = 48
IMAGE_SIDE = 72  # the loose crops: small photos each holding one face at a random pose
FEATURE_DIM = 24


# ----------------------------------------------------------------------------------------------------
# The synthetic layout


def write_layout(root: Path, target: str = "IJBC", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # subjects alike (a shared pattern plus a little of their own), photos noisy: an imperfect ROC
    shared = rng.uniform(0, 255, (7, 7, 3))
    faces = [cv2.resize((0.8 * shared + 0.2 * rng.uniform(0, 255, (7, 7, 3))).astype(np.uint8), (112, 112),
                        interpolation=cv2.INTER_CUBIC) for _ in range(SUBJECTS)]
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    name_lines, tid_lines, subjects = [], [], []
    for template in range(1, TEMPLATES + 1):
        subject = int(rng.integers(SUBJECTS))
        subjects.append(subject)
        for _ in range(int(rng.integers(1, 4))):  # media per template; ids shared among a subject's templates
            media = 1000 * subject + int(rng.integers(4))
            for _ in range(int(rng.integers(1, 4))):
                name = f"{len(name_lines) + 1}.jpg"
                landmarks = paste_face(faces[subject], root / "loose_crop" / name, rng)
                score = rng.uniform(0.3, 1.0)
                name_lines.append(" ".join([name, *(f"{v:.3f}" for v in landmarks.ravel()), f"{score:.4f}"]))
                tid_lines.append(f"{name} {template} {media}")
    pairs = [f"{a + 1} {b + 1} {int(subjects[a] == subjects[b])}"
             for a in range(TEMPLATES) for b in range(a + 1, TEMPLATES)]
    for suffix, lines in (("name_5pts_score", name_lines), ("face_tid_mid", tid_lines),
                          ("template_pair_label", pairs)):
        ijb.meta_file(root, target, suffix).write_text("\n".join(lines) + "\n")


def paste_face(face: np.ndarray, path: Path, rng) -> np.ndarray:
    """The face moved by a random similarity into a noisy IMAGE_SIDE photo; returns its landmarks there."""
    angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.45, 0.6)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = IMAGE_SIDE / 2 - rotation @ np.array([56.0, 64.0]) + rng.uniform(-4, 4, 2)
    matrix = np.c_[rotation, shift]
    photo = cv2.warpAffine(face, matrix, (IMAGE_SIDE, IMAGE_SIDE), borderValue=(90, 90, 90))
    noise = rng.normal(0, 40, photo.shape)
    cv2.imwrite(str(path), np.clip(photo + noise, 0, 255).astype(np.uint8))
    return ARCFACE_TEMPLATE @ rotation.T + shift + rng.normal(0, 0.5, (5, 2))


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ijb")
    write_layout(root)
    return root


class ProjectionModel:
    """A fixed model on NCHW batches: the pixels recovered as integers (so that ``x / 127.5 - 1`` and
    ``(x / 255 - 0.5) / 0.5``, which round differently in float32, give the same features), 8x8 average
    pooling, then a random projection, row by row."""

    data_format = "NCHW"

    def __init__(self, image_size: int = 112, seed: int = 1):
        self.pooled = 3 * (image_size // 8) ** 2
        self.weights = np.random.default_rng(seed).normal(size=(self.pooled, FEATURE_DIM))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n, c, h, w = batch.shape
        pixels = np.rint((batch.astype(np.float64) + 1) * 127.5)
        pooled = pixels.reshape(n, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5)).reshape(n, -1)
        # einsum without BLAS: each row's arithmetic does not depend on the batch it came in
        return np.einsum("nk,kd->nd", pooled, self.weights, optimize=False).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The reference pipeline (eval_ijbc.py's protocol, written as plain loops)


def reference_features(root: Path, target: str, model, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(flip-summed raw features float32 [faces, d], detector scores float32), one face at a time."""
    features, scores = [], []
    for line in ijb.meta_file(root, target, "name_5pts_score").read_text().split("\n"):
        if not line:
            continue
        fields = line.split(" ")
        image = cv2.imread(str(root / "loose_crop" / fields[0]))
        landmarks = np.array([float(v) for v in fields[1:11]], np.float32).reshape(5, 2)
        rgb = cv2.cvtColor(align_face(image, landmarks, image_size), cv2.COLOR_BGR2RGB)
        pair = np.stack([rgb, cv2.flip(rgb, 1)]).transpose(0, 3, 1, 2).astype(np.float32)
        embeddings = model((pair / 255 - 0.5) / 0.5)
        features.append(embeddings[0] + embeddings[1])
        scores.append(float(fields[11]))
    return np.array(features, np.float32), np.array(scores, np.float32)


def reference_scores(root: Path, target: str, features: np.ndarray, scores: np.ndarray) -> tuple[list, list]:
    """(pair labels, pair cosines): detector-weighted faces, media means summed per template, normalised."""
    weighted = features * scores[:, None]  # float32 * float32, as eval_ijbc.py's arrays
    rows = [line.split() for line in ijb.meta_file(root, target, "face_tid_mid").read_text().splitlines()]
    template_feature = {}
    for template in sorted({int(r[1]) for r in rows}):
        medias: dict[int, list] = {}
        for index, row in enumerate(rows):
            if int(row[1]) == template:
                medias.setdefault(int(row[2]), []).append(weighted[index].astype(np.float64))
        total = np.zeros(features.shape[1])
        for media in sorted(medias):
            total += np.mean(medias[media], axis=0)
        template_feature[template] = total / np.linalg.norm(total)
    labels, cosines = [], []
    for line in ijb.meta_file(root, target, "template_pair_label").read_text().splitlines():
        a, b, label = (int(v) for v in line.split())
        labels.append(label)
        cosines.append(float(template_feature[a] @ template_feature[b]))
    return labels, cosines


def reference_roc(labels: list, scores: list) -> tuple[list, list]:
    """sklearn roc_curve's points, counted at each distinct score from the highest, collinear ones dropped."""
    positives = sum(labels)
    negatives = len(labels) - positives
    points = []
    for threshold in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= threshold and y == 1)
        fp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= threshold and y == 0)
        points.append((fp, tp))
    kept = [points[i] for i in range(len(points))
            if i in (0, len(points) - 1)
            or points[i + 1][0] - 2 * points[i][0] + points[i - 1][0] != 0
            or points[i + 1][1] - 2 * points[i][1] + points[i - 1][1] != 0]
    kept = [(0, 0), *kept]
    return [fp / negatives for fp, _ in kept], [tp / positives for _, tp in kept]


def reference_tar(fpr: list, tpr: list, far: float) -> float:
    """The TPR of the point nearest ``far``; among equally near points the one latest in the ROC."""
    best = None
    for index in reversed(range(len(fpr))):
        if best is None or abs(fpr[index] - far) < abs(fpr[best] - far):
            best = index
    return tpr[best]


def reference_tars(root: Path, target: str, model, image_size: int) -> dict[str, float]:
    labels, cosines = reference_scores(root, target, *reference_features(root, target, model, image_size))
    fpr, tpr = reference_roc(labels, cosines)
    return {f"{far:.0e}": reference_tar(fpr, tpr, far) for far in ijb.FARS}


# ----------------------------------------------------------------------------------------------------
# Tests


def test_roc_curve_matches_sklearns_documented_example():
    # sklearn.metrics.roc_curve's docstring: y = [1, 1, 2, 2] (2 positive), scores [0.1, 0.4, 0.35, 0.8]
    fpr, tpr, thresholds = ijb.roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])


@pytest.mark.parametrize("seed", range(5))
def test_roc_and_tar_match_the_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(labels, 1.0), 1)  # coarse: many tied scores and collinear runs
    fpr, tpr, _ = ijb.roc_curve(labels, scores)
    ref_fpr, ref_tpr = reference_roc(labels.tolist(), scores.tolist())
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)
    fars = (1e-3, 1e-2, 0.05, 0.1, 0.3)
    assert ijb.tar_at_far(fpr, tpr, fars) == {f"{f:.0e}": reference_tar(ref_fpr, ref_tpr, f) for f in fars}


def test_pipeline_matches_the_reference_on_a_synthetic_layout(layout):
    model = ProjectionModel()
    result = ijb.evaluate_ijb(model, 112, layout, "IJBC", batch_size=7)["IJBC"]
    expected = reference_tars(layout, "IJBC", model, 112)
    assert result["tar_at_far"] == expected
    assert 0.0 < min(expected.values()) < max(expected.values())  # the numbers say something
    assert result["templates"] == TEMPLATES and result["pairs"] == TEMPLATES * (TEMPLATES - 1) // 2


def test_features_and_scores_match_the_reference_closely(layout):
    model = ProjectionModel()
    meta = ijb.read_meta(layout, "IJBC")
    features = ijb.embed_faces(model, 112, layout, meta, batch_size=5)
    ref_features, ref_detector = reference_features(layout, "IJBC", model, 112)
    np.testing.assert_array_equal(features, ref_features)
    pooled, ids = ijb.template_features(ijb.face_inputs(features, meta.scores), meta.templates, meta.medias)
    _, ref_cosines = reference_scores(layout, "IJBC", ref_features, ref_detector)
    cosines = ijb.pair_scores(pooled, ids, meta.pair_templates)
    np.testing.assert_allclose(cosines, ref_cosines, rtol=0, atol=1e-12)


def test_cli_writes_json_and_roc(layout, tmp_path, capsys, monkeypatch):
    model = ProjectionModel()
    monkeypatch.setattr("plsc.eval.sources.identify", lambda path, engine: path)
    monkeypatch.setattr("plsc.eval.sources.open_model", lambda path, engine, **hints: (model, 112))
    out, roc = tmp_path / "ijb.json", tmp_path / "roc.png"
    assert cli.main(["eval", "--model", "m", "--ijb", str(layout), "--target", "IJBC", "--json", str(out),
                     "--roc", str(roc)]) == 0
    written = json.loads(out.read_text())
    assert list(written["IJBC"]["tar_at_far"]) == ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert written["IJBC"]["tar_at_far"] == reference_tars(layout, "IJBC", model, 112)
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TAR at FAR" in capsys.readouterr().out


def test_missing_meta_and_bad_flags_are_one_line_errors(layout, tmp_path, capsys):
    with pytest.raises(PlscError, match="ijbb_name_5pts_score.txt"):
        ijb.read_meta(layout, "IJBB")
    roc = str(tmp_path / "r.png")
    assert cli.main(["eval", "--model", str(tmp_path), "--bin", "x.bin", "--roc", roc]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "plsc: error: --roc draws an IJB ROC: it needs --ijb"


def test_pairs_naming_unknown_templates_are_refused(layout, tmp_path):
    copy = tmp_path / "copy"
    (copy / "meta").mkdir(parents=True)
    for suffix in ("name_5pts_score", "face_tid_mid"):
        ijb.meta_file(copy, "IJBC", suffix).write_text(ijb.meta_file(layout, "IJBC", suffix).read_text())
    ijb.meta_file(copy, "IJBC", "template_pair_label").write_text("1 999 1\n1 2 0\n")
    with pytest.raises(PlscError, match="1 templates have no face"):
        ijb.read_meta(copy, "IJBC")


@pytest.mark.cpu_slow(reason="builds and reads a PLSC v2.2 ResNet checkpoint (~35 s); the IJB "
                              "pipeline's equality tests stay fast")
def test_cli_runs_a_plsc22_checkpoint_as_its_source_model(layout, tmp_path):
    """A real model kind end to end (identify, restore, dygraph embedder, 112 px alignment, NCHW): the
    command's numbers are those of the model the checkpoint was written from, run directly."""
    import paddle
    from model_weights import random_state
    from test_plsc22_import import write_backbone, write_meta

    from plsc.eval.embedders import DygraphEmbedder
    from plsc.models import MODELS

    source = MODELS["iresnet18"](embedding_size=16, width=0.125, data_format="NCHW", input_size=112)
    state = random_state(source)
    source.set_state_dict({key: paddle.to_tensor(value) for key, value in state.items()})
    source.eval()
    checkpoint = tmp_path / "plsc22"
    write_backbone(checkpoint, source, state)
    write_meta(checkpoint, 16, 10, 1)
    out = tmp_path / "ijb.json"
    assert cli.main(["eval", "--model", str(checkpoint), "--ijb", str(layout), "--engine", "dygraph",
                     "--batch-size", "32", "--json", str(out)]) == 0
    expected = ijb.evaluate_ijb(DygraphEmbedder(source, "NCHW"), 112, layout, "IJBC", batch_size=32)
    assert json.loads(out.read_text()) == expected


def test_roc_without_matplotlib_and_ijb_with_run_are_one_line_errors(layout, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import fails as if missing
    with pytest.raises(PlscError, match=r"^plsc eval --roc needs matplotlib: pip install 'plsc\[plot\]'$"):
        ijb.draw_roc(np.array([0.0, 1.0]), np.array([0.0, 1.0]), "IJBC", tmp_path / "roc.png")
    (tmp_path / "run").mkdir()
    assert cli.main(["eval", "--run", str(tmp_path / "run"), "--ijb", str(layout)]) == 2
    assert capsys.readouterr().err.strip().startswith("plsc: error: --ijb evaluates one model")
