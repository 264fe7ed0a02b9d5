"""The annotated output image: a box per face and a "name score" label above it.

With a font file (``--font``) and Pillow installed, labels are drawn by Pillow and any name the font covers
renders (Chinese names need a CJK font such as PLSC's SourceHanSansCN-Medium.otf). Otherwise OpenCV's
``putText`` draws them, which knows ASCII only: other characters become '?'.
"""

from __future__ import annotations

import colorsys
import logging
import zlib
from pathlib import Path

import cv2
import numpy as np

from plsc.demo.index import UNKNOWN
from plsc.errors import PlscError

log = logging.getLogger("plsc.demo")

UNKNOWN_COLOUR = (160, 160, 160)  # BGR grey
TEXT_COLOUR = (255, 255, 255)


def name_colour(name: str) -> tuple[int, int, int]:
    """A BGR colour fixed by the name, so one person has one colour across images and runs."""
    if name == UNKNOWN:
        return UNKNOWN_COLOUR
    hue = (zlib.crc32(name.encode("utf-8")) % 360) / 360.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.9)
    return int(blue * 255), int(green * 255), int(red * 255)


class Labeller:
    """Draws boxes and labels onto BGR images; chooses Pillow or OpenCV once, up front."""

    def __init__(self, font_file: str | Path | None = None):
        self.font_file = None
        self.warned_ascii = False
        if font_file is None:
            return
        font_file = Path(font_file)
        if not font_file.is_file():
            raise PlscError(f"font file not found: {font_file}")
        try:
            from PIL import ImageFont
        except ImportError:
            log.warning("Pillow is not installed: --font ignored, names drawn by cv2.putText (ASCII only)")
            return
        try:
            ImageFont.truetype(str(font_file), 12)
        except OSError:
            raise PlscError(f"cannot load the font {font_file} (not a TrueType/OpenType file?)") from None
        self.font_file = font_file

    def draw(self, image: np.ndarray, faces: list[dict]) -> np.ndarray:
        """A copy of ``image`` with each face's ``box``, ``name`` and ``score`` drawn."""
        canvas = image.copy()
        thickness = max(2, round(min(image.shape[:2]) / 300))
        for face in faces:
            x1, y1, x2, y2 = face["box"]
            cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), name_colour(face["name"]), thickness)
        if self.font_file is not None:
            return self._pillow_labels(canvas, faces)
        for face in faces:
            self._opencv_label(canvas, face)
        return canvas

    def _opencv_label(self, canvas: np.ndarray, face: dict) -> None:
        text = label_text(face)
        ascii_text = text.encode("ascii", "replace").decode("ascii")
        if ascii_text != text and not self.warned_ascii:
            log.warning("cv2.putText draws ASCII only: pass --font FILE (with Pillow installed) for %r", text)
            self.warned_ascii = True
        x1, y1, x2, _ = face["box"]
        scale = max(0.4, (x2 - x1) / 250)
        (width, height), baseline = cv2.getTextSize(ascii_text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        left, top = label_corner(x1, y1, width, height + baseline, canvas.shape[1])
        bottom_right = (left + width, top + height + baseline)
        cv2.rectangle(canvas, (left, top), bottom_right, name_colour(face["name"]), cv2.FILLED)
        cv2.putText(canvas, ascii_text, (left, top + height), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_COLOUR, 1,
                    cv2.LINE_AA)

    def _pillow_labels(self, canvas: np.ndarray, faces: list[dict]) -> np.ndarray:
        from PIL import Image, ImageDraw, ImageFont

        picture = Image.fromarray(np.ascontiguousarray(canvas[:, :, ::-1]))
        draw = ImageDraw.Draw(picture)
        for face in faces:
            x1, y1, x2, _ = face["box"]
            font = ImageFont.truetype(str(self.font_file), max(12, (x2 - x1) // 8))
            text = label_text(face)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            x, y = label_corner(x1, y1, right - left, bottom - top, picture.width)
            blue, green, red = name_colour(face["name"])
            draw.rectangle([x, y, x + right - left, y + bottom - top], fill=(red, green, blue))
            draw.text((x - left, y - top), text, font=font, fill=TEXT_COLOUR)
        return np.ascontiguousarray(np.asarray(picture)[:, :, ::-1])


def label_corner(x1: int, y1: int, width: int, height: int, image_width: int) -> tuple[int, int]:
    """Top-left corner of a label: just above the box, moved left or down to stay inside the image."""
    return max(0, min(x1, image_width - width)), max(0, y1 - height)


def label_text(face: dict) -> str:
    return f"{face['name']} {face['score']:.2f}"
