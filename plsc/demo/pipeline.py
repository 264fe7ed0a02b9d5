"""``plsc demo index`` and ``plsc demo recognize``: detection, crop, embedding, search, vote, output files.

Everything is read and checked before anything is written, and every file is written atomically, so a failed
run leaves no partial index or output behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from plsc import strict_json
from plsc.atomic import write_atomic
from plsc.data.folder import read_image
from plsc.demo.detect import DETECTOR_THRESHOLD, open_detector, whole_image
from plsc.demo.draw import Labeller
from plsc.demo.embed import FaceEmbedder, open_embedder
from plsc.demo.index import GalleryIndex, check_same_model, load_index, save_index, top_k, vote
from plsc.errors import PlscError
from plsc.faces.align import CENTRE_CROP_MARGIN, TEMPLATE_SIZE, face_crop, square_crop
from plsc.faces.detect import largest_face
from plsc.names import distinct_names

log = logging.getLogger("plsc.demo")

DEFAULT_MARGIN = CENTRE_CROP_MARGIN  # for faces without landmarks (Haar, BlazeFace): see plsc.faces.align
DEFAULT_THRESHOLD = 0.45  # PLSC v2.2 demo's rec_thresh; used when the model records no verification threshold
DEFAULT_CANDIDATES = 10


def detector_options(model_file=None, params_file=None, threshold=None, haar_cascade=None,
                     name="auto") -> dict:
    """Keyword arguments for :func:`plsc.demo.detect.open_detector` from the CLI's detector flags."""
    threshold = DETECTOR_THRESHOLD if threshold is None else threshold
    return {"model_file": model_file, "params_file": params_file, "threshold": threshold,
            "haar_cascade": haar_cascade, "name": name}


# ----------------------------------------------------------------------------------------------------
# Gallery


def read_label_file(path: str | Path) -> list[tuple[str, str, int]]:
    """(relative image path, name, line number) per line of ``IMAGE<TAB>NAME`` (or whitespace-separated)."""
    path = Path(path)
    if not path.is_file():
        raise PlscError(f"label file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PlscError(f"{path}: not a UTF-8 text file") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t", 1) if "\t" in line else line.rsplit(None, 1)
        fields = [field.strip() for field in fields]
        if len(fields) != 2 or not all(fields):
            raise PlscError(f"{path}:{number}: expected 'IMAGE<TAB>NAME', got {line.strip()!r}")
        entries.append((fields[0], fields[1], number))
    if not entries:
        raise PlscError(f"{path}: no gallery entries")
    return entries


def gallery_files(gallery: Path, label_file: Path) -> list[tuple[Path, str]]:
    if not gallery.is_dir():
        raise PlscError(f"gallery folder not found: {gallery}")
    files = []
    for relative, name, number in read_label_file(label_file):
        path = gallery / relative
        if not path.is_file():
            raise PlscError(f"{label_file}:{number}: gallery image not found: {path}")
        files.append((path, name))
    return files


def build_index(
    gallery: str | Path,
    model: str | Path,
    index_path: str | Path,
    label_file: str | Path | None = None,
    engine: str | None = None,
    detector: dict | None = None,
    margin: float | None = None,
) -> GalleryIndex:
    """Embed the largest face of every gallery image (the whole image when none is found); write the index."""
    gallery = Path(gallery)
    label_file = Path(label_file) if label_file else gallery / "label.txt"
    margin = DEFAULT_MARGIN if margin is None else margin
    check_margin(margin)
    files = gallery_files(gallery, label_file)
    embedder = open_embedder(model, engine, images=2 * len(files))  # a crop per image, and its mirror
    find_faces = open_detector(**(detector or {}))
    crops, boxes, detected = [], [], []
    for path, _ in files:
        image = read_image(path)
        face = largest_face(find_faces(image))
        log.info("%s: %s", path.relative_to(gallery), describe_face(face) if face else
                 "no face found, using the whole image")
        box = face.box if face else whole_image(image).box
        # a face is cut as plsc prepare cuts training faces; a whole image is only padded square
        crops.append(face_crop(image, face, TEMPLATE_SIZE, margin) if face else square_crop(image, box, 0.0))
        boxes.append(box)
        detected.append(face is not None)
    index = GalleryIndex(
        embeddings=embedder.embed(crops),
        names=[name for _, name in files],
        paths=[str(path.relative_to(gallery)) for path, _ in files],
        boxes=np.array(boxes, np.int32),
        detected=np.array(detected, bool),
        probe=embedder.probe,
        meta={"model": embedder.description, "detector": find_faces.name, "margin": margin,
              "gallery": str(gallery.resolve())},
    )
    save_index(index_path, index)
    log.info("index of %d faces (%d people, %d without a detected face) written to %s", len(files),
             len(set(index.names)), int((~index.detected).sum()), index_path)
    return index


def describe_face(face) -> str:
    x1, y1, x2, y2 = face.box
    return f"face {x2 - x1}x{y2 - y1} at ({x1}, {y1})"


def check_margin(margin: float) -> None:
    if not 0 <= margin <= 1:
        raise PlscError(f"the crop margin is a fraction of the box per side, within [0, 1]; got {margin}")


# ----------------------------------------------------------------------------------------------------
# Recognition


def recognize(
    index_path: str | Path,
    model: str | Path,
    inputs: str | Path,
    output: str | Path,
    cdd_num: int = DEFAULT_CANDIDATES,
    threshold: float | None = None,
    font: str | Path | None = None,
    engine: str | None = None,
    detector: dict | None = None,
    margin: float | None = None,
) -> list[dict]:
    """Name every face of the input image(s); write <name> (annotated) and <stem>.json per image to output."""
    from plsc.export import list_images

    check_search_options(cdd_num, threshold)
    labeller = Labeller(font)
    paths = list_images(inputs)
    images = [read_image(path) for path in paths]  # an unreadable input stops the run before any work
    index = load_index(index_path)
    margin = index.meta.get("margin", DEFAULT_MARGIN) if margin is None else margin
    check_margin(margin)
    embedder = open_embedder(model, engine)
    check_same_model(index, embedder.probe, index_path)
    threshold = choose_threshold(threshold, embedder)
    find_faces = open_detector(**(detector or {}))
    settings = {"index": str(index_path), "model": embedder.description, "detector": find_faces.name,
                "threshold": threshold, "cdd_num": cdd_num, "margin": margin}
    results = [
        {"input": str(path), "size": [image.shape[1], image.shape[0]], **settings,
         "faces": name_faces(image, find_faces(image), embedder, index, cdd_num, threshold, margin)}
        for path, image in zip(paths, images, strict=True)
    ]
    pictures = [labeller.draw(image, result["faces"]) for image, result in zip(images, results, strict=True)]
    write_outputs(Path(output), output_names(paths, Path(inputs)), pictures, results)
    return results


def check_search_options(cdd_num: int, threshold: float | None) -> None:
    if cdd_num < 1:
        raise PlscError(f"--cdd-num must be >= 1, got {cdd_num}")
    if threshold is not None and not -1 <= threshold <= 1:
        raise PlscError(f"the threshold is a cosine similarity within [-1, 1], got {threshold}")


def choose_threshold(threshold: float | None, embedder: FaceEmbedder) -> float:
    if threshold is not None:
        log.info("threshold %.3f (--threshold)", threshold)
        return threshold
    if embedder.threshold is not None:
        log.info("threshold %.3f: the model's verification threshold as a cosine", embedder.threshold)
        return embedder.threshold
    log.info("threshold %.2f (PLSC's demo default; the model records none): tune it with --threshold",
             DEFAULT_THRESHOLD)
    return DEFAULT_THRESHOLD


def name_faces(image, faces, embedder: FaceEmbedder, index: GalleryIndex, cdd_num, threshold, margin):
    """One JSON-ready record per detected face: box, detector score, name, score, votes, candidates."""
    embeddings = embedder.embed([face_crop(image, face, TEMPLATE_SIZE, margin) for face in faces])
    indices, similarities = top_k(index.embeddings, embeddings, cdd_num)
    records = []
    for face, rows, sims in zip(faces, indices, similarities, strict=True):
        names = [index.names[row] for row in rows]
        decision = vote(names, sims.tolist(), threshold)
        log.info("%s -> %s (cosine %.3f, votes %d of %d)", describe_face(face), decision.name, decision.score,
                 decision.votes, len(names))
        candidates = [
            {"name": name, "path": index.paths[row], "similarity": round(float(sim), 6)}
            for name, row, sim in zip(names, rows, sims, strict=True)
        ]
        records.append({
            "box": list(face.box), "detection_score": face.score, "name": decision.name,
            "score": round(decision.score, 6), "votes": decision.votes, "candidates": candidates,
        })
    if not faces:
        log.info("no face found")
    return records


def output_names(paths: list[Path], inputs: Path) -> list[Path]:
    """Each input's path relative to the input folder (its file name for a single file). Two inputs whose
    results would share a file (``a.jpg`` and ``a.png`` both give ``a.json``) are refused."""
    names = [path.relative_to(inputs) for path in paths] if inputs.is_dir() else [Path(p.name) for p in paths]
    results = zip(map(str, paths), (str(name.with_suffix(".json")) for name in names), strict=True)
    distinct_names(results, "--input")
    return names


def write_outputs(output: Path, names: list[Path], pictures: list[np.ndarray], results: list[dict]) -> None:
    encoded = []
    for name, picture in zip(names, pictures, strict=True):
        ok, data = cv2.imencode(name.suffix or ".jpg", picture)
        if not ok:
            raise PlscError(f"OpenCV cannot write {name.suffix} images")
        encoded.append(data.tobytes())
    for name, data, result in zip(names, encoded, results, strict=True):
        target = output / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)
        write_atomic(target.with_suffix(".json"), strict_json.dumps(result, indent=1) + "\n")
        log.info("wrote %s and %s", target, target.with_suffix(".json").name)

