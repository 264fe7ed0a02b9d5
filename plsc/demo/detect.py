"""Face detection for the demo, and the square face crop that goes to the recognition model.

Two detectors, both returning :class:`Face` boxes in the input image's pixel coordinates:

* :class:`HaarDetector` (default): OpenCV's bundled frontal-face Haar cascade. It needs no download, so the
  demo runs offline; OpenCV 5 dropped ``CascadeClassifier``, hence the ``opencv<5`` pin.
* :class:`PaddleDetector`: a PaddleDetection model exported for Paddle Inference, such as the BlazeFace that
  PLSC v2.2's demo downloads (``blazeface_fpn_ssh_1000e``). Such an export takes ``image`` plus ``im_shape``
  and ``scale_factor`` and returns ``[N, 6]`` rows ``class, score, x1, y1, x2, y2`` in original-image pixels
  (rows of class -1 pad an empty result). It is fed as PLSC's demo feeds it: RGB resized to 640 x 640,
  ImageNet mean/std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from plsc.errors import PlscError

log = logging.getLogger("plsc.demo")

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
HAAR_MIN_NEIGHBORS = 5  # OpenCV's usual value: fewer lets in background false positives
HAAR_MIN_FACE = 24  # the cascade's own window size
HAAR_MAX_SIDE = 1280  # larger photos are searched downscaled: the cascade's cost grows with the area

DETECTOR_INPUT_SIZE = 640  # what PLSC v2.2's demo resizes to for BlazeFace
DETECTOR_THRESHOLD = 0.5
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class Face:
    """A detected face: ``box`` is (x1, y1, x2, y2) in pixels, x2/y2 exclusive; ``score`` is detector-specific
    (Haar: how many neighbouring windows agreed; Paddle detectors: their confidence)."""

    box: tuple[int, int, int, int]
    score: float

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


# ----------------------------------------------------------------------------------------------------
# Haar cascade


def bundled_cascade() -> Path:
    data = getattr(cv2, "data", None)
    if data is None:  # some OpenCV builds ship without the cascade files
        raise PlscError(f"this OpenCV has no bundled cascades: pass --haar-cascade PATH/{HAAR_CASCADE}")
    return Path(data.haarcascades) / HAAR_CASCADE


class HaarDetector:
    """OpenCV's Viola-Jones frontal face detector, on the histogram-equalised grey image."""

    def __init__(self, cascade_file: str | Path | None = None, min_neighbors: int = HAAR_MIN_NEIGHBORS):
        if not hasattr(cv2, "CascadeClassifier"):
            raise PlscError(
                f"OpenCV {cv2.__version__} has no CascadeClassifier (removed in OpenCV 5): install "
                "opencv-python-headless<5, or pass a Paddle detector with --det-model-file-path"
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


# ----------------------------------------------------------------------------------------------------
# PaddleDetection export (BlazeFace)


class PaddleDetector:
    """A PaddleDetection inference model; ``predictor`` is a ``paddle.inference`` predictor (or a stand-in
    with the same handle methods), so the feeding and decoding here are testable without a model file."""

    def __init__(self, predictor, name: str, threshold: float = DETECTOR_THRESHOLD,
                 input_size: int = DETECTOR_INPUT_SIZE):
        self.predictor = predictor
        self.name = name
        self.threshold = threshold
        self.input_size = input_size

    @classmethod
    def from_files(cls, model_file: str | Path, params_file: str | Path | None = None,
                   threshold: float = DETECTOR_THRESHOLD, threads: int | None = None) -> PaddleDetector:
        model_file = Path(model_file)
        params_file = Path(params_file) if params_file else model_file.with_suffix(".pdiparams")
        for path in (model_file, params_file):
            if not path.is_file():
                raise PlscError(f"detection model file not found: {path}")
        from paddle import inference

        from plsc.runtime import default_threads, first_line

        config = inference.Config(str(model_file), str(params_file))
        config.set_cpu_math_library_num_threads(threads or default_threads())
        config.disable_glog_info()
        try:
            predictor = inference.create_predictor(config)
        except Exception as exc:  # Paddle raises assorted C++ error types here
            raise PlscError(f"Paddle Inference cannot load {model_file}: {first_line(exc)}") from None
        return cls(predictor, f"paddle:{model_file.name}", threshold)

    def feeds(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The three inputs of a PaddleDetection export for one BGR image."""
        height, width = image.shape[:2]
        size = self.input_size
        rgb = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
        normalised = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return {
            "image": np.ascontiguousarray(normalised.transpose(2, 0, 1)[None]),
            "im_shape": np.array([[size, size]], np.float32),
            "scale_factor": np.array([[size / height, size / width]], np.float32),
        }

    def __call__(self, image: np.ndarray) -> list[Face]:
        feeds = self.feeds(image)
        for name in self.predictor.get_input_names():
            if name not in feeds:
                raise PlscError(f"{self.name}: unexpected input {name!r}, not a PaddleDetection export")
            handle = self.predictor.get_input_handle(name)
            handle.reshape(list(feeds[name].shape))
            handle.copy_from_cpu(feeds[name])
        self.predictor.run()
        output = self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()
        return self.decode(np.asarray(output), image.shape[:2])

    def decode(self, rows: np.ndarray, image_shape: tuple[int, int]) -> list[Face]:
        """Confident ``[class, score, x1, y1, x2, y2]`` rows as faces clipped to the image."""
        if rows.ndim != 2 or rows.shape[1] < 6:
            raise PlscError(f"{self.name}: expected [N, 6] detections, got shape {list(rows.shape)}")
        height, width = image_shape
        faces = []
        for label, score, *box in rows[:, :6].tolist():
            if label < 0 or score < self.threshold:  # class -1 rows pad an empty result
                continue
            x1, x2 = (int(round(min(max(v, 0), width))) for v in (box[0], box[2]))
            y1, y2 = (int(round(min(max(v, 0), height))) for v in (box[1], box[3]))
            if x2 > x1 and y2 > y1:
                faces.append(Face((x1, y1, x2, y2), float(score)))
        return sorted(faces, key=lambda face: -face.score)


def open_detector(model_file=None, params_file=None, threshold=DETECTOR_THRESHOLD, haar_cascade=None):
    """The Paddle detector when a model file is given, else the Haar cascade."""
    if model_file:
        return PaddleDetector.from_files(model_file, params_file, threshold)
    if params_file:
        raise PlscError("--det-params-file-path needs --det-model-file-path")
    return HaarDetector(haar_cascade)


# ----------------------------------------------------------------------------------------------------
# Cropping


def largest_face(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda face: face.area, default=None)


def whole_image(image: np.ndarray) -> Face:
    return Face((0, 0, image.shape[1], image.shape[0]), 0.0)


def square_crop(image: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """The square around the box's centre, its side the box's longer side grown by ``margin`` on each side;
    what falls outside the image is black (shifting the square inwards would move the face off-centre)."""
    x1, y1, x2, y2 = box
    side = max(1, int(round(max(x2 - x1, y2 - y1) * (1 + 2 * margin))))
    left = int(round((x1 + x2 - side) / 2))
    top = int(round((y1 + y2 - side) / 2))
    crop = np.zeros((side, side, 3), np.uint8)
    src_x1, src_y1 = max(left, 0), max(top, 0)
    src_x2, src_y2 = min(left + side, image.shape[1]), min(top + side, image.shape[0])
    if src_x2 > src_x1 and src_y2 > src_y1:
        crop[src_y1 - top : src_y2 - top, src_x1 - left : src_x2 - left] = image[src_y1:src_y2, src_x1:src_x2]
    return crop
