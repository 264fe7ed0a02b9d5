"""Evaluation: face verification on insightface ``.bin`` sets (lfw, cfp_fp, agedb_30, ...)."""

from plsc.eval.verification import (
    combine_flip,
    embed_verification_set,
    evaluate,
    tar_at_far,
    verify,
    xnorm,
)

__all__ = ["combine_flip", "embed_verification_set", "evaluate", "tar_at_far", "verify", "xnorm"]
