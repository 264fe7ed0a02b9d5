"""Face recognition demo (PLSC v2.2 README section 10): detect faces, embed them, name them from a gallery.

``plsc demo index`` embeds one face per gallery image into an index file; ``plsc demo recognize`` detects the
faces of a query image, embeds each and names it by a vote of its nearest gallery faces, or ``unknown``. See
:mod:`plsc.demo.pipeline` for the steps, :mod:`plsc.demo.index` for the index file and the vote.
"""

from plsc.demo.index import UNKNOWN, GalleryIndex, load_index, top_k, vote
from plsc.demo.pipeline import DEFAULT_MARGIN, DEFAULT_THRESHOLD, build_index, recognize

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_THRESHOLD",
    "UNKNOWN",
    "GalleryIndex",
    "build_index",
    "load_index",
    "recognize",
    "top_k",
    "vote",
]
