"""Face detection for the demo.

The detectors all return :class:`plsc.faces.detect.Face` boxes in the input image's pixel coordinates:

* by default, :func:`plsc.faces.detect.open_face_detector`'s: MTCNN with five landmarks when the ``faces``
  extra is installed (faces are then aligned as ``plsc prepare`` aligns training faces), else OpenCV's
  bundled Haar cascade (boxes only: faces are centre-cropped);
* :class:`PaddleDetector`: a PaddleDetection model exported for Paddle Inference, such as the BlazeFace that
  PLSC v2.2's demo downloads (``blazeface_fpn_ssh_1000e``). Such an export takes ``image`` plus ``im_shape``
  and ``scale_factor`` and returns ``[N, 6]`` rows ``class, score, x1, y1, x2, y2`` in original-image pixels
  (rows of class -1 pad an empty result). It is fed as PLSC's demo feeds it: RGB resized to 640 x 640,
  ImageNet mean/std.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from plsc.errors import PlscError
from plsc.faces.align import square_crop  # noqa: F401  (the demo's crop, re-exported)
from plsc.faces.detect import Face, HaarDetector, largest_face, open_face_detector  # noqa: F401

log = logging.getLogger("plsc.demo")

DETECTOR_INPUT_SIZE = 640  # what PLSC v2.2's demo resizes to for BlazeFace
DETECTOR_THRESHOLD = 0.5
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


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


def open_detector(model_file=None, params_file=None, threshold=DETECTOR_THRESHOLD, haar_cascade=None,
                  name="auto"):
    """The Paddle detector when a model file is given, else plsc's face detector ``name``
    (:func:`plsc.faces.detect.open_face_detector`; a given Haar cascade means ``haar``)."""
    if model_file:
        return PaddleDetector.from_files(model_file, params_file, threshold)
    if params_file:
        raise PlscError("--det-params-file-path needs --det-model-file-path")
    return open_face_detector("haar" if haar_cascade and name == "auto" else name, haar_cascade)


# ----------------------------------------------------------------------------------------------------
# Cropping


def whole_image(image: np.ndarray) -> Face:
    return Face((0, 0, image.shape[1], image.shape[0]), 0.0)
