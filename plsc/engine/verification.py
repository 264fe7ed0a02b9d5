"""Verification during training: rank 0's model on the ``data.val_bins`` sets, the work split across the
ranks, and which sets' accuracy beats the best so far (their ``best_model/<name>`` is saved again)."""

from __future__ import annotations

import logging

from plsc.config import Config
from plsc.distributed import share_statistics_from_rank0
from plsc.eval.embedders import open_embedder
from plsc.eval.verification import embedded_images, verify_across_ranks

log = logging.getLogger("plsc.train")


def evaluate(model, val_sets: list, config: Config, comm) -> dict[str, dict]:
    """Verification of rank 0's model (the one checkpoints hold): ``{set name: metrics}``."""
    share_statistics_from_rank0(model, comm)
    model.eval()
    results = {}
    if val_sets:  # on the CPU a Paddle Inference snapshot of the current weights, unless too few images
        images = embedded_images(sum(len(vset.images) for vset in val_sets))
        embed = open_embedder(model, config.model, config.data.image_size, images=images)
    for vset in val_sets:
        results[vset.name] = verify_across_ranks(embed, vset, config.train.eval_batch_size, embed.data_format,
                                                 config.model.embedding_size, comm, progress=comm.rank == 0)
    model.train()
    return results


def improved(results: dict[str, dict], best: dict[str, dict], step: int, comm) -> list[str]:
    """The sets whose accuracy beats ``best`` (updated in place with ``step``), agreed by every rank; each
    result logged."""
    names = []
    for name, metrics in results.items():
        line = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "pairs")
        log.info("step %d verification %s: %s", step, name, line)
        # Saving is collective: the ranks must agree, whatever rounding a rank's own comparison saw.
        if comm.any_true(metrics["accuracy"] > best.get(name, {}).get("accuracy", -1.0)):
            best[name] = {**metrics, "step": step}
            names.append(name)
    return names
