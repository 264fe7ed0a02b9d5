"""Entry of a measuring process for an older PartialFC: ``python -m legacy_head {time,rss} SPEC_JSON``.

bench/compare_head.py runs it with this folder on PYTHONPATH and PLSC_BASELINE_TREE = a copy of plsc at an
older commit, with today's plsc/bench copied in. The PartialFC of commit f257797 computes its loss in one
``__call__``; the benchmark times phases through ``prepare`` / ``sample_tensors`` / ``loss``, so those are
attached here, each exactly a part of that ``__call__``. A PartialFC that has them is left alone.
"""

from __future__ import annotations

import os
import sys


def attach_phases(partial_fc_class) -> None:
    import paddle
    import paddle.nn.functional as F

    from plsc.loss.margin import margin_logits, softmax_cross_entropy
    from plsc.loss.sparse_momentum import gather_rows

    def sample_tensors(self, all_labels, step):
        index, remapped = self.sample(all_labels.numpy(), step)
        return paddle.to_tensor(index), paddle.to_tensor(remapped)

    def prepare(self, labels, step):
        all_labels = self.comm.all_gather(labels.reshape([-1]))
        self._index, remapped = self.sample_tensors(all_labels, step)
        sampled = gather_rows(self.weight, self._index)
        sampled.stop_gradient = False
        self._sampled = sampled
        return sampled, remapped

    def loss(self, all_embeddings, sampled, remapped):
        embeddings, centers = F.normalize(all_embeddings, axis=1), F.normalize(sampled, axis=1)
        cosine = paddle.matmul(embeddings, centers, transpose_y=True)
        return softmax_cross_entropy(margin_logits(cosine, remapped, self.margin), remapped, self.comm)

    partial_fc_class.sample_tensors = sample_tensors
    partial_fc_class.prepare = prepare
    partial_fc_class.loss = loss


def main() -> int:
    # First on the path: ``python -m`` puts the working directory (maybe a checkout with today's plsc) first.
    tree = os.environ["PLSC_BASELINE_TREE"]
    sys.path.insert(0, tree)
    import plsc

    if not os.path.abspath(plsc.__file__).startswith(os.path.abspath(tree)):
        raise SystemExit(f"legacy_head: imported plsc from {plsc.__file__}, not from {tree}")
    from plsc.bench import head
    from plsc.loss.partial_fc import PartialFC

    if not hasattr(PartialFC, "prepare"):
        attach_phases(PartialFC)
    return head.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
