"""Alignment of a face to insightface's ArcFace template: the least-squares similarity transform (rotation,
uniform scale, translation) that maps five detected landmarks onto the template's, then one affine warp.

This is the behaviour of insightface's ``norm_crop`` (python-package/insightface/utils/face_align.py:11-31:
skimage's ``SimilarityTransform.estimate``, i.e. Umeyama's least-squares similarity, then
``cv2.warpAffine`` with a black border); every public data set plsc trains on (MS1M, Glint360k, LFW .bin
files) was cut this way.
"""

from __future__ import annotations

import cv2
import numpy as np

from plsc.errors import PlscError

# Five landmarks of a 112x112 ArcFace crop, in the order (image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner): insightface
# python-package/insightface/utils/face_align.py:6-9.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
TEMPLATE_SIZE = 112
JPEG_QUALITY = 95  # cv2.imencode's default, with which insightface's packing tools encode their crops


def template_for(image_size: int) -> np.ndarray:
    """The template for a square crop of ``image_size``: scaled from 112 for multiples of 112; for multiples
    of 128, scaled from 128 with the face kept centred by an 8/128 shift in x (insightface's rule,
    face_align.py:13-20)."""
    if image_size > 0 and image_size % TEMPLATE_SIZE == 0:
        return ARCFACE_TEMPLATE * (image_size / TEMPLATE_SIZE)
    if image_size > 0 and image_size % 128 == 0:
        ratio = image_size / 128
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise PlscError(f"aligned face size must be a multiple of 112 or 128, got {image_size}")


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the similarity (no reflection) that maps ``source`` points [N, 2] onto ``target``
    with the least squared error (Umeyama 1991, eq. 40-42)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise PlscError(f"similarity transform needs two matching [N>=2, 2] point sets, got "
                        f"{source.shape} and {target.shape}")
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best fit would mirror the face: take the best rotation
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    variance = (source_centred ** 2).sum() / len(source)
    if variance == 0:
        raise PlscError("similarity transform: the source points all coincide")
    scale = float((singular * sign).sum() / variance)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = target_mean - scale * rotation @ source_mean
    return matrix


def alignment_matrix(landmarks: np.ndarray, image_size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 2x3 matrix taking image coordinates to the aligned crop's, from five landmarks [5, 2]."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise PlscError(f"alignment needs five (x, y) landmarks, got shape {list(landmarks.shape)}")
    return similarity_transform(landmarks, template_for(image_size))


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The ``image_size`` square crop of ``image`` with the landmarks moved onto the ArcFace template; what
    falls outside the photo is black, as in insightface's crops."""
    matrix = alignment_matrix(landmarks, image_size)
    return cv2.warpAffine(image, matrix, (image_size, image_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [N, 2] moved by a 2x3 affine matrix."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


# Grown by 5% per side, OpenCV's Haar box of an LFW frame (~114 px of 250) covers the 126 px centre crop that
# the bundled faces (data/tiny) were cut with: a crop without landmarks then frames the face as they do.
CENTRE_CROP_MARGIN = 0.05


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


def face_crop(image: np.ndarray, face, image_size: int = TEMPLATE_SIZE,
              margin: float = CENTRE_CROP_MARGIN) -> np.ndarray:
    """A detected face (:class:`plsc.faces.detect.Face`) as an ``image_size`` square: aligned on its
    landmarks when it has them, else the square around its box resized (centred, not aligned)."""
    if face.landmarks is not None:
        return align_face(image, np.asarray(face.landmarks), image_size)
    crop = square_crop(image, face.box, margin)
    interpolation = cv2.INTER_AREA if crop.shape[0] > image_size else cv2.INTER_LINEAR
    return cv2.resize(crop, (image_size, image_size), interpolation=interpolation)


def encode_jpeg(image: np.ndarray) -> bytes:
    """A crop as the JPEG bytes plsc stores (training images, .rec records, .bin entries)."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise PlscError("OpenCV cannot encode JPEG images")
    return data.tobytes()
