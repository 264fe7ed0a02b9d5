"""Backbones and the one registry that builds them from a :class:`plsc.config.ModelConfig`.

Every constructor takes ``embedding_size, width, data_format, dropout, input_size`` and returns a
``paddle.nn.Layer`` mapping float32 images ([N, 3, S, S] for NCHW, [N, S, S, 3] for NHWC) to raw
embeddings [N, E].
"""

from __future__ import annotations

from typing import Callable

from paddle import nn

from plsc.errors import PlscError
from plsc.models import iresnet, mobilefacenet, vit
from plsc.models.iresnet import (
    IResNet,
    iresnet18,
    iresnet34,
    iresnet50,
    iresnet100,
    iresnet200,
)
from plsc.models.layers import Plsc22Name
from plsc.models.mobilefacenet import MobileFaceNet

MODELS: dict[str, Callable[..., nn.Layer]] = {
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
    "iresnet200": iresnet200,
    "mobilefacenet": mobilefacenet.mobilefacenet,
    # PLSC v2.2 backbone names, so its configs and checkpoints' directory names work unchanged.
    "FresResNet50": iresnet50,
    "FresResNet100": iresnet100,
    "MobileFaceNet_128": mobilefacenet.mobilefacenet,
    # insightface arcface_torch's face ViTs (they also take model.patch_mask_ratio and model.drop_path).
    **{name: getattr(vit, name) for name in vit.ARCHS},
}


def build_model(cfg, image_size: int = 112) -> nn.Layer:
    """Build ``cfg.name`` (a ModelConfig) for square ``image_size`` inputs; unknown names raise PlscError."""
    if cfg.name not in MODELS:
        raise PlscError(f"unknown model '{cfg.name}' (known: {', '.join(MODELS)})")
    return MODELS[cfg.name](
        embedding_size=cfg.embedding_size,
        width=cfg.width,
        data_format=cfg.data_format,
        dropout=cfg.dropout,
        input_size=image_size,
        **_vit_options(cfg),
    )


def _vit_options(cfg) -> dict:
    """The ViT-only settings, refused for a backbone without patches rather than silently ignored."""
    if cfg.name in vit.ARCHS:
        return {"mask_ratio": cfg.patch_mask_ratio, "drop_path": cfg.drop_path}
    given = [f"model.{key}" for key in ("patch_mask_ratio", "drop_path") if getattr(cfg, key) is not None]
    if given:
        raise PlscError(f"{' and '.join(given)} apply to ViT models only ({', '.join(vit.ARCHS)}), "
                        f"not {cfg.name}")
    return {}


def plsc22_names(model: nn.Layer) -> dict[str, Plsc22Name]:
    """``{state_dict key: Plsc22Name(key, ckpt_name, static_name)}`` for importing PLSC v2.2 weights."""
    if isinstance(model, IResNet):
        return iresnet.plsc22_names(model)
    if isinstance(model, MobileFaceNet):
        return mobilefacenet.plsc22_names(model)
    raise PlscError(f"{type(model).__name__} has no PLSC v2.2 counterpart")


def plsc22_key_map(model: nn.Layer) -> dict[str, str]:
    """``{state_dict key: PLSC v2.2 structured state_dict key}``; see :func:`plsc22_names` for file stems."""
    return {key: name.key for key, name in plsc22_names(model).items()}


__all__ = [
    "MODELS",
    "IResNet",
    "MobileFaceNet",
    "Plsc22Name",
    "build_model",
    "plsc22_key_map",
    "plsc22_names",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
]
