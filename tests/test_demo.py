"""The face recognition demo: search and vote, detection, crops, index file, CLI end to end, bad input.

No trained model is bundled, so naming is checked two ways: the search/vote logic against hand-made embeddings
whose answers are known, and the whole pipeline with a tiny untrained IResNet-18 checkpoint (written with
plsc's own checkpoint code), which cannot tell strangers apart but does recognise a face from a crop of the
same photo. Detection is checked against the cells of ``../shared/data/demo/query/group1.jpg``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import paddle
import pytest

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.config import load_config
from plsc.demo import UNKNOWN, build_index, load_index, recognize, top_k, vote
from plsc.demo import index as demo_index
from plsc.demo.detect import Face, HaarDetector, PaddleDetector, square_crop
from plsc.demo.draw import Labeller
from plsc.demo.embed import open_embedder, verification_threshold
from plsc.distributed import LocalComm
from plsc.errors import PlscError
from plsc.faces.detect import bundled_cascade, mtcnn_available
from plsc.loss.margin import ARCFACE
from plsc.loss.partial_fc import PartialFC
from plsc.models import build_model

IMAGE_SIZE = 32
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def write_checkpoint(directory: Path, embedding_size: int = 16, seed: int = 3) -> Path:
    """An untrained tiny backbone saved as a plsc checkpoint (4 dummy classes)."""
    config = load_config(overrides=[
        "model.name=iresnet18", "model.width=0.125", f"model.embedding_size={embedding_size}",
        f"data.image_size={IMAGE_SIZE}",
    ])
    paddle.seed(seed)
    model = build_model(config.model, image_size=IMAGE_SIZE)
    head = PartialFC(num_classes=4, embedding_size=embedding_size, margin=ARCFACE)
    return ckpt.save_checkpoint(directory, comm=LocalComm(), state=ckpt.TrainingState(),
                                config=config.to_dict(), model=model, optimizer=None, head=head)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "best_model" / "lfw")


@pytest.fixture(scope="module")
def demo(shared_dir) -> Path:
    return shared_dir / "data" / "demo"


@pytest.fixture(scope="module")
def expected(demo) -> list[dict]:
    return json.loads((demo / "query" / "expected.json").read_text())["query/group1.jpg"]


def cell_of(box, cells) -> int | None:
    """Index of the cell wholly containing the box, if any."""
    x1, y1, x2, y2 = box
    for number, cell in enumerate(cells):
        cx1, cy1, cx2, cy2 = cell["cell"]
        if cx1 <= x1 < x2 <= cx2 and cy1 <= y1 < y2 <= cy2:
            return number
    return None


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plsc: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


# ----------------------------------------------------------------------------------------------------
# Search and vote, on hand-made similarities and embeddings


def test_vote_majority_wins_and_ties_go_to_summed_similarity():
    decision = vote(["A", "B", "B"], [0.9, 0.6, 0.5], threshold=0.4)
    assert (decision.name, decision.votes, decision.score) == ("B", 2, pytest.approx(0.6))
    # two votes each: B's 0.8 + 0.5 beats A's 0.9 + 0.3
    assert vote(["A", "B", "A", "B"], [0.9, 0.8, 0.3, 0.5], threshold=0.2).name == "B"
    # the threshold removes B's second vote: one each, A's larger similarity wins
    decision = vote(["A", "B", "B"], [0.9, 0.6, 0.5], threshold=0.55)
    assert (decision.name, decision.votes, decision.score) == ("A", 1, pytest.approx(0.9))


def test_vote_below_threshold_or_negative_is_unknown():
    decision = vote(["A", "B"], [0.3, 0.1], threshold=0.35)
    assert (decision.name, decision.votes, decision.score) == (UNKNOWN, 0, pytest.approx(0.3))
    # a cosine of -0.95 is opposite, not similar: no abs()
    decision = vote(["A", "B"], [0.1, -0.95], threshold=0.3)
    assert (decision.name, decision.score) == (UNKNOWN, pytest.approx(0.1))
    assert vote(["A"], [0.3], threshold=0.3).name == "A"  # at the threshold counts


def test_top_k_orders_by_cosine():
    degrees = np.array([0, 90, 180, 45])
    gallery = np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1)
    query = np.array([[np.cos(np.radians(10)), np.sin(np.radians(10))]])
    indices, similarities = top_k(gallery, query, k=10)  # k beyond the gallery: all of it
    assert indices.tolist() == [[0, 3, 1, 2]]
    np.testing.assert_allclose(similarities[0], np.cos(np.radians([10, 35, 80, 170])), atol=1e-6)
    assert top_k(gallery, query, k=2)[0].tolist() == [[0, 3]]


def test_search_and_vote_name_hand_made_faces():
    rng = np.random.default_rng(0)
    people = unit(rng.normal(size=(3, 32)))
    gallery = unit(np.repeat(people, 2, axis=0) + rng.normal(scale=0.05, size=(6, 32)))
    names = ["ann", "ann", "bob", "bob", "cyd", "cyd"]
    stranger = unit(rng.normal(size=32) - people.sum(0))  # far from everyone
    queries = np.vstack([unit(people + rng.normal(scale=0.05, size=(3, 32))), stranger])
    indices, similarities = top_k(gallery, queries, k=4)
    decided = [
        vote([names[i] for i in row], sims.tolist(), 0.5).name
        for row, sims in zip(indices, similarities, strict=True)
    ]
    assert decided == ["ann", "bob", "cyd", UNKNOWN]


def test_large_gallery_is_searched_with_faiss_when_installed(monkeypatch):
    class FlatIP:  # stands in for faiss.IndexFlatIP: exact inner-product search
        def __init__(self, dim):
            self.rows = np.zeros((0, dim), np.float32)

        def add(self, rows):
            self.rows = rows

        def search(self, queries, k):
            sims = queries @ self.rows.T
            order = np.argsort(-sims, axis=1)[:, :k]
            return np.take_along_axis(sims, order, 1), order

    used = []
    fake_faiss = SimpleNamespace(IndexFlatIP=lambda dim: used.append(dim) or FlatIP(dim))
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss)
    monkeypatch.setattr(demo_index, "FAISS_MIN_GALLERY", 3)
    gallery = unit(np.random.default_rng(1).normal(size=(5, 4)))
    indices, similarities = top_k(gallery, gallery[[2]], k=2)
    assert used == [4] and indices[0, 0] == 2 and similarities[0, 0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# Detection and cropping


def test_haar_finds_each_face_in_its_cell(demo, expected):
    image = cv2.imread(str(demo / "query" / "group1.jpg"))
    faces = HaarDetector()(image)
    assert sorted(cell_of(face.box, expected) for face in faces) == list(range(len(expected)))


def test_square_crop_is_centred_and_padded_black():
    image = np.full((100, 200, 3), 200, np.uint8)
    crop = square_crop(image, (0, 10, 40, 50), margin=0.25)  # 40 px box -> 60 px square from x = -10
    assert crop.shape == (60, 60, 3)
    assert (crop[:, :10] == 0).all() and (crop[:, 10:] == 200).all()
    assert square_crop(image, (80, 20, 120, 60), margin=0.0).shape == (40, 40, 3)


class FakeHandle:
    def __init__(self, sink: dict, name: str, output=None):
        self.sink, self.name, self.output = sink, name, output

    def reshape(self, shape):
        self.sink[f"{self.name}.shape"] = shape

    def copy_from_cpu(self, array):
        self.sink[self.name] = array.copy()

    def copy_to_cpu(self):
        return self.output


class FakePredictor:
    """The handle API of a paddle.inference predictor, returning fixed detections."""

    def __init__(self, rows):
        self.fed, self.rows, self.runs = {}, np.asarray(rows, np.float32), 0

    def get_input_names(self):
        return ["image", "scale_factor", "im_shape"]

    def get_input_handle(self, name):
        return FakeHandle(self.fed, name)

    def run(self):
        self.runs += 1

    def get_output_names(self):
        return ["boxes", "boxes_num"]

    def get_output_handle(self, name):
        return FakeHandle(self.fed, name, self.rows)


def test_paddle_detector_feeds_and_decodes():
    rows = [
        [0, 0.95, 10.4, -5, 90, 70],  # kept, clipped to the image
        [0, 0.3, 0, 0, 9, 9],  # below the threshold
        [-1, 0.99, 0, 0, 5, 5],  # class -1: padding
        [0, 0.7, 300, 300, 400, 400],  # outside the image
    ]
    predictor = FakePredictor(rows)
    image = np.zeros((80, 160, 3), np.uint8)
    image[..., 2] = 255  # pure red in BGR
    faces = PaddleDetector(predictor, "fake", threshold=0.5, input_size=64)(image)
    assert faces == [Face((10, 0, 90, 70), pytest.approx(0.95))]
    fed = predictor.fed
    assert fed["image.shape"] == [1, 3, 64, 64] and predictor.runs == 1
    np.testing.assert_allclose(fed["im_shape"], [[64, 64]])
    np.testing.assert_allclose(fed["scale_factor"], [[64 / 80, 64 / 160]])
    red = (1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225  # RGB channels, ImageNet mean/std
    np.testing.assert_allclose(fed["image"][0, :, 5, 5], red, rtol=1e-5)
    with pytest.raises(PlscError, match=r"expected \[N, 6\]"):
        PaddleDetector(FakePredictor([[0, 0.9, 1, 2]]), "fake")(image)


def xyxy(pair):
    """[1, 2] in (y, x) order (im_shape, scale_factor) -> [1, 4] in (x1, y1, x2, y2) order."""
    return paddle.concat([pair[:, 1:2], pair[:, 0:1]], axis=1).tile([1, 2])


class FakeBlazeFace(paddle.nn.Layer):
    """Inputs and output of an exported PaddleDetection model: fixed boxes in 640 x 640 input pixels, clipped
    to im_shape and divided by scale_factor back to original-image pixels (module level: Paddle 2.6's
    dy2static cannot see a closure's names)."""

    def __init__(self):
        super().__init__()
        self.bias = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(0.0))

    def forward(self, image, im_shape, scale_factor):
        rows = paddle.to_tensor([[0.0, 0.9, 160, 160, 700, 480], [0.0, 0.2, 0, 0, 64, 64]])
        boxes = paddle.minimum(rows[:, 2:], xyxy(im_shape)) / xyxy(scale_factor)
        scores = rows[:, 1:2] + self.bias + 0.0 * paddle.mean(image)
        return paddle.concat([rows[:, 0:1], scores, boxes], axis=1)


def test_paddle_detector_runs_a_paddle_inference_model(tmp_path):
    specs = [paddle.static.InputSpec([1, 3, -1, -1], "float32", "image"),
             paddle.static.InputSpec([1, 2], "float32", "im_shape"),
             paddle.static.InputSpec([1, 2], "float32", "scale_factor")]
    paddle.jit.save(FakeBlazeFace(), str(tmp_path / "inference"), input_spec=specs)
    model_file = next(path for path in tmp_path.iterdir() if path.suffix in (".json", ".pdmodel"))
    detector = PaddleDetector.from_files(model_file)  # parameters found beside it
    faces = detector(np.zeros((240, 320, 3), np.uint8))  # scale_factor (640/240, 640/320)
    assert [face.box for face in faces] == [(80, 60, 320, 180)]


# ----------------------------------------------------------------------------------------------------
# Model


def test_embedding_is_rgb_normalised_and_flip_summed(tiny_model):
    embedder = open_embedder(tiny_model)
    crop = np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    resized = cv2.resize(crop, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    rgb = (resized[:, :, ::-1].astype(np.float32) / 255 - 0.5) / 0.5
    batch = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])
    reference = unit(embedder.run(batch) + embedder.run(np.ascontiguousarray(batch[..., ::-1])))
    np.testing.assert_allclose(embedder.embed([crop]), reference, atol=1e-5)
    assert embedder.description["kind"] == "checkpoint" and embedder.embedding_size == 16


def test_threshold_comes_from_the_checkpoints_verification(tmp_path):
    folder = tmp_path / "best_model" / "lfw"
    folder.mkdir(parents=True)
    (folder / ckpt.MANIFEST).write_text(json.dumps({"best_metric": {"lfw": {"threshold": 1.5}}}))
    assert verification_threshold(folder) == pytest.approx(0.25)  # squared distance 1.5 = 2 - 2 cos
    assert verification_threshold(tmp_path) is None


# ----------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def demo_run(demo, tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("demo_run")
    index, output = root / "gallery.npz", root / "output"
    label = demo / "gallery/label.txt"
    assert cli.main(["demo", "index", "--gallery", str(demo / "gallery"), "--label", str(label),
                     "--model", str(tiny_model), "--index", str(index)]) == 0
    assert cli.main(["demo", "recognize", "--index", str(index), "--model", str(tiny_model), "--input",
                     str(demo / "query/group1.jpg"), "--output", str(output), "--cdd-num", "5"]) == 0
    return index, output


def test_index_file_holds_normalised_gallery_embeddings(demo, demo_run):
    index = load_index(demo_run[0])
    labels = [line.split("\t") for line in (demo / "gallery/label.txt").read_text().splitlines()]
    assert index.names == [name for _, name in labels] and index.paths == [path for path, _ in labels]
    assert index.embeddings.shape == (8, 16) and index.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    assert index.detected.all()  # every gallery photo has a face
    default_detector = "mtcnn:" if mtcnn_available() else "haar:"  # plsc.faces.detect.open_face_detector
    assert index.meta["model"]["name"] == "iresnet18" and index.meta["detector"].startswith(default_detector)


def test_recognize_writes_annotated_image_and_json(demo, demo_run, expected):
    output = demo_run[1]
    assert sorted(path.name for path in output.iterdir()) == ["group1.jpg", "group1.json"]
    picture = cv2.imread(str(output / "group1.jpg"))
    assert picture.shape == cv2.imread(str(demo / "query/group1.jpg")).shape
    result = json.loads((output / "group1.json").read_text())
    assert result["size"] == [750, 500] and result["cdd_num"] == 5 and result["threshold"] == 0.45
    faces = result["faces"]
    assert sorted(cell_of(face["box"], expected) for face in faces) == list(range(6))
    gallery_names = set(load_index(demo_run[0]).names)
    for face in faces:
        similarities = [candidate["similarity"] for candidate in face["candidates"]]
        assert len(similarities) == 5 and similarities == sorted(similarities, reverse=True)
        assert face["name"] in gallery_names | {UNKNOWN}
        assert (face["name"] == UNKNOWN) == (similarities[0] < result["threshold"])


def test_faces_are_named_from_a_gallery_of_the_same_photos(demo, expected, tiny_model, tmp_path):
    """Even an untrained model maps a face and a crop of the same photo closest together."""
    image = cv2.imread(str(demo / "query/group1.jpg"))
    gallery, lines = tmp_path / "gallery", []
    gallery.mkdir()
    for number, cell in enumerate(expected):
        if cell["name"] != UNKNOWN:
            x1, y1, x2, y2 = cell["cell"]
            cv2.imwrite(str(gallery / f"{number}.png"), image[y1:y2, x1:x2])
            lines.append(f"{number}.png\t{cell['name']}")
    (gallery / "label.txt").write_text("\n".join(lines) + "\n")
    build_index(gallery, tiny_model, tmp_path / "index.npz")
    result = recognize(tmp_path / "index.npz", tiny_model, demo / "query/group1.jpg", tmp_path / "out",
                       threshold=0.0)[0]
    named = {cell_of(face["box"], expected): face["name"] for face in result["faces"]}
    for number, cell in enumerate(expected):
        if cell["name"] != UNKNOWN:
            assert named[number] == cell["name"]


def onnx_usable() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import paddle2onnx  # noqa: F401
    except Exception:  # ImportError, or paddle2onnx 2.x refusing Paddle 2.6 with a ValueError
        return False
    return True


@pytest.mark.cpu_slow(reason="exports the model to Paddle and ONNX before indexing with each (~8 "
                              "s)")
def test_exports_and_checkpoint_share_an_index(demo, tiny_model, tmp_path):
    """The index check accepts the same weights through any engine, and they name faces alike."""
    from plsc.export import export_checkpoint

    formats = ["paddle", "onnx"] if onnx_usable() else ["paddle"]
    for export_format in formats:
        export_checkpoint(tiny_model, tmp_path / "exported", export_format)
    label = tmp_path / "label.txt"
    label.write_text("Paul_Byrd/Paul_Byrd_0001.jpg\tPaul_Byrd\nFlor_Montulo/Flor_Montulo_0001.jpg\tFlor_Montulo\n")
    build_index(demo / "gallery", tmp_path / "exported", tmp_path / "index.npz", label, engine="paddle")
    assert load_index(tmp_path / "index.npz").meta["model"]["kind"] == "export:paddle"
    query = demo / "query/group1.jpg"
    runs = [recognize(tmp_path / "index.npz", tiny_model, query, tmp_path / "out_checkpoint")]
    runs += [recognize(tmp_path / "index.npz", tmp_path / "exported", query, tmp_path / f"out_{engine}",
                       engine=engine) for engine in formats]
    similarities = [[c["similarity"] for f in run[0]["faces"] for c in f["candidates"]] for run in runs]
    for other in similarities[1:]:
        np.testing.assert_allclose(other, similarities[0], atol=1e-4)


def test_gallery_image_without_a_face_is_used_whole(demo, tiny_model, tmp_path, caplog):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    cv2.imwrite(str(gallery / "blank.png"), np.full((60, 40, 3), 128, np.uint8))
    (gallery / "face.jpg").write_bytes((demo / "gallery/Paul_Byrd/Paul_Byrd_0001.jpg").read_bytes())
    (gallery / "label.txt").write_text("blank.png\tNobody\nface.jpg\tPaul Byrd\n")
    with caplog.at_level(logging.INFO, logger="plsc.demo"):
        index = build_index(gallery, tiny_model, tmp_path / "index.npz")
    assert index.detected.tolist() == [False, True] and index.boxes[0].tolist() == [0, 0, 40, 60]
    assert index.names == ["Nobody", "Paul Byrd"]  # whitespace in a name survives the tab separator
    assert "no face found, using the whole image" in caplog.text


def test_labels_render_unicode_with_a_font_else_ascii(caplog):
    pytest.importorskip("PIL")
    image = np.zeros((200, 300, 3), np.uint8)
    faces = [{"box": [50, 60, 150, 160], "name": "Zoë Ångström", "score": 0.61}]
    plain = Labeller().draw(image, faces)
    assert "ASCII only" in caplog.text and plain.any()
    if FONT.is_file():
        drawn = Labeller(FONT).draw(image, faces)
        assert drawn.shape == image.shape and not np.array_equal(drawn, plain)
    with pytest.raises(PlscError, match="font file not found"):
        Labeller("/nonexistent/font.ttf")


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def test_input_that_is_not_an_image_fails_cleanly(capsys, demo_run, tiny_model, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture\n")
    code, _, err = run_cli(capsys, "demo", "recognize", "--index", demo_run[0], "--model", tiny_model,
                           "--input", text, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "cannot decode image", "notes.jpg")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("embedding_size, seed, message", [(8, 3, "embeddings of size 16"),
                                                             (16, 4, "different model")])
def test_index_of_another_model_is_refused(capsys, demo, demo_run, tmp_path, embedding_size, seed, message):
    other = write_checkpoint(tmp_path / "other", embedding_size, seed)
    code, _, err = run_cli(capsys, "demo", "recognize", "--index", demo_run[0], "--model", other,
                           "--input", demo / "query/group1.jpg", "--output", tmp_path / "out")
    assert_one_line_error(code, err, message, "rebuild")
    assert not (tmp_path / "out").exists()


def test_missing_gallery_file_fails_before_writing(capsys, demo, tiny_model, tmp_path):
    label = tmp_path / "label.txt"
    label.write_text("Paul_Byrd/Paul_Byrd_0001.jpg\tPaul_Byrd\nNobody/missing.jpg\tNobody\n")
    code, _, err = run_cli(capsys, "demo", "index", "--gallery", demo / "gallery", "--label", label,
                           "--model", tiny_model, "--index", tmp_path / "index.npz")
    assert_one_line_error(code, err, "label.txt:2", "gallery image not found", "missing.jpg")
    assert list(tmp_path.iterdir()) == [label]


def test_bad_index_model_and_options_fail_cleanly(capsys, demo, demo_run, tiny_model, tmp_path):
    corrupt = tmp_path / "index.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    common = ["--input", demo / "query/group1.jpg", "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, "demo", "recognize", "--index", corrupt, "--model", tiny_model, *common)
    assert_one_line_error(code, err, "not a plsc demo index")
    index, missing = demo_run[0], tmp_path / "nope"
    code, _, err = run_cli(capsys, "demo", "recognize", "--index", index, "--model", missing, *common)
    assert_one_line_error(code, err, "model not found")
    code, _, err = run_cli(capsys, "demo", "recognize", "--index", index, "--model", tiny_model,
                           "--cdd-num", "0", *common)
    assert_one_line_error(code, err, "--cdd-num must be >= 1")
    assert not (tmp_path / "out").exists()


def test_demo_detector_choice_follows_plsc_prepare():
    from plsc.demo.detect import open_detector
    from plsc.faces.detect import MtcnnDetector

    assert isinstance(open_detector(name="haar"), HaarDetector)
    assert isinstance(open_detector(haar_cascade=str(bundled_cascade())), HaarDetector)
    if mtcnn_available():
        assert isinstance(open_detector(), MtcnnDetector) and isinstance(open_detector(name="mtcnn"),
                                                                         MtcnnDetector)
    with pytest.raises(PlscError, match="unknown face detector"):
        open_detector(name="yolo")
