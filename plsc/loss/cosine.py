"""The head's cosine layer: ``cosine(embeddings, centers)`` with a hand-written backward
(:class:`_CosineToCenters`), and the [k, emb] scratch buffers it and PartialFC reuse from step to step.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from plsc.loss.margin import in_place_allowed
from plsc.loss.sums import column_sums

# F.normalize's default epsilon: norms below it are replaced by it.
NORMALIZE_EPS = 1e-12


def scale_columns(matrix: paddle.Tensor, factors: paddle.Tensor) -> paddle.Tensor:
    """``matrix * factors[None, :]``, in place when allowed (see ``in_place_allowed``).

    Against the 1-D ``factors`` itself: Paddle's CPU broadcast of a [1, k] operand takes its generic index
    path (3-7x slower at [128, 100000]), an expand() materialises a [batch, k] copy, and the 1-D operand
    does neither (measured on 2.6.2 and 3.3.1: multiply_ 10 ms against 14-16 ms expanded, 57 ms [1, k]).
    """
    return matrix.multiply_(factors) if in_place_allowed() else matrix * factors


class ScratchRows:
    """One [rows, emb] tensor kept from step to step, for the class centers' gradient.

    On CPU a fresh tensor of that size is fresh pages from the OS (glibc unmaps freed buffers over 32 MiB),
    and faulting them in costs more than the arithmetic written into them: at 100,000 x 512 the head's
    backward took 0.91 s with this instead of 1.21 s (0.69 against 0.92 s in a second pair of runs). Paddle
    hands the gradient a PyLayer returns to the leaf's ``.grad`` without a copy (2.6 and 3.x, tested), so the
    leaf's gradient *is* this tensor until the next backward overwrites it; PartialFC consumes it in
    :meth:`PartialFC.apply` before that.
    """

    def __init__(self):
        self.tensor: paddle.Tensor | None = None

    def like(self, other: paddle.Tensor) -> paddle.Tensor:
        return self.shaped(other.shape, other.dtype)

    def shaped(self, shape: list[int], dtype) -> paddle.Tensor:
        if self.tensor is None or self.tensor.shape != list(shape) or self.tensor.dtype != dtype:
            self.tensor = None  # the old one goes first: never two at once
            self.tensor = paddle.empty(shape, dtype=dtype)
        return self.tensor

    def release(self) -> None:
        self.tensor = None


def radial_rows(centers: paddle.Tensor, radial: paddle.Tensor, scratch: ScratchRows | None) -> paddle.Tensor:
    """``centers * -radial[:, None]``, written into ``scratch`` when given and in-place ops are allowed."""
    factors = (-radial).unsqueeze(1)  # a [k, 1] operand: Paddle's fast broadcast along rows
    if scratch is None or not in_place_allowed():
        return centers * factors
    rows = scratch.like(centers)
    rows.copy_(centers, False)
    return rows.multiply_(factors)


def products(saved: paddle.Tensor, grad: paddle.Tensor) -> paddle.Tensor:
    """``saved * grad``, written over ``saved`` when in-place ops are allowed: the backward's last use of it,
    and one [batch, k] allocation less at the step's memory peak (51 MB at k=100,000, batch 128)."""
    return saved.multiply_(grad) if in_place_allowed() else saved * grad


class _CosineToCenters(paddle.autograd.PyLayer):
    """``matmul(unit_embeddings, F.normalize(centers, axis=1), transpose_y=True)`` without normalised centers.

    The centers' norms scale the columns of the [batch, k] product instead of the [k, emb] rows, and the
    backward is written out: ``d centers = G^T unit_embeddings - (sum_b G * cosine) / |w| * centers`` with
    ``G = d cosine / |w|``, one addmm into one [k, emb] buffer. F.normalize's autograd makes about five
    [k, emb] temporaries instead, each a fresh allocation costing more than its arithmetic.
    """

    @staticmethod
    def forward(ctx, unit_embeddings, centers, scratch: ScratchRows | None):
        # Squared row norms as k dot products (bmm): no [k, emb] temporary, unlike square().sum() or p_norm.
        norms = paddle.sqrt(paddle.bmm(centers.unsqueeze(1), centers.unsqueeze(2)).reshape([-1]))
        inverse_norms = 1.0 / paddle.clip(norms, min=NORMALIZE_EPS)  # F.normalize's floor on the norm
        cosine = scale_columns(paddle.matmul(unit_embeddings, centers, transpose_y=True), inverse_norms)
        # Where the floor is active the norm is a constant: no gradient through it (as F.normalize).
        norm_is_live = (norms > NORMALIZE_EPS).astype(norms.dtype)
        ctx.save_for_backward(unit_embeddings, centers, inverse_norms, norm_is_live, cosine)
        # Paddle wants None, not a gradient, for an input that stops gradient; it also saves a matmul.
        ctx.wants_grad = (not unit_embeddings.stop_gradient, not centers.stop_gradient)
        ctx.scratch = scratch
        return cosine

    @staticmethod
    def backward(ctx, grad_cosine):
        unit_embeddings, centers, inverse_norms, norm_is_live, cosine = ctx.saved_tensor()
        # The incoming gradient is the autograd engine's own buffer (in PartialFC: the margin softmax's
        # exponentials; a tensor passed to backward() is copied first, tested on 2.6 and 3.x): scaled in
        # place.
        grad = scale_columns(grad_cosine, inverse_norms)
        grad_embeddings = grad_centers = None
        if ctx.wants_grad[0]:
            grad_embeddings = paddle.matmul(grad, centers)
        if ctx.wants_grad[1]:
            grad_centers = center_grad(unit_embeddings, grad, centers, cosine, inverse_norms, norm_is_live,
                                       ctx.scratch)
        return grad_embeddings, grad_centers


def center_grad(unit_embeddings, grad, centers, cosine, inverse_norms, norm_is_live,
                scratch: ScratchRows | None = None) -> paddle.Tensor:
    """d loss / d centers [k, emb] of ``cosine = unit_embeddings @ (centers / |centers|)^T``:
    ``G^T unit_embeddings - radial * centers``, with ``G`` [batch, k] = d loss / d cosine already scaled by
    the inverse norms and ``radial_j = sum_b G_bj cosine_bj / |w_j|`` (0 where the norm is floored).

    Written into ``scratch`` when given; overwrites ``cosine`` when in-place ops are allowed (its last use).
    """
    radial = column_sums(products(cosine, grad)) * inverse_norms * norm_is_live
    grad_centers = radial_rows(centers, radial, scratch)
    if in_place_allowed():
        return grad_centers.addmm_(grad.t(), unit_embeddings)
    return paddle.addmm(grad_centers, grad.t(), unit_embeddings)


def cosine_to_centers(
    embeddings: paddle.Tensor, centers: paddle.Tensor, scratch: ScratchRows | None = None
) -> paddle.Tensor:
    """[batch, k] cosine similarity of each embedding with each center row, differentiable in both.

    ``scratch``: where the centers' gradient is written (see ScratchRows); it then lives there, overwritten by
    the next backward through the same scratch. In eager mode the backward overwrites the returned cosine
    (it is saved for the backward, whose last use of it is a product with the gradient): read it before.
    """
    return _CosineToCenters.apply(F.normalize(embeddings, axis=1), centers, scratch)
