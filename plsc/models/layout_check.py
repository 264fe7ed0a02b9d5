"""The backbone's channels-last fast path: NHWC on cuDNN, used only once it matches the same weights in NCHW.

On CPU, NHWC runs on the portable CPU convolutions (slower than NCHW there; a GPU tensor-core effect).
"""

from __future__ import annotations

import numpy as np
import paddle

from plsc.parity import ENABLED, PARITY_TOLERANCE, FastPath, attempt, differs, on_gpu


def check_cudnn_nhwc(model: paddle.nn.Layer, data_format: str, build_nchw_twin, image_size: int) -> FastPath:
    """``build_nchw_twin()``: the same weights built for NCHW (called only when there is a check to run)."""
    if data_format != "NHWC":
        return FastPath("cudnn_nhwc", "unavailable (the model is NCHW)")
    if not on_gpu():
        return FastPath("cudnn_nhwc", "unavailable (CPU: NHWC runs on the portable CPU convolutions)")

    def parity() -> str:
        twin = build_nchw_twin()
        images = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 3, image_size, image_size)))
        images = images.astype("float32")
        model.eval()
        twin.eval()
        with paddle.no_grad():
            error = differs(model(images.transpose([0, 2, 3, 1])), twin(images))
        model.train()
        return ENABLED if error <= PARITY_TOLERANCE else f"failed (differs from NCHW by {error:.2g})"

    return attempt("cudnn_nhwc", parity)
