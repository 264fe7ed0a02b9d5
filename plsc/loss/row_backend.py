"""Every CPU speed trick of the head, each beside its plain reference in Paddle ops that the tests compare it
against (``reference_*``).

The tricks: numpy views of a CPU tensor's own memory (``host_view`` over ``data_ptr()``); float16 <-> float32
casts by OpenCV (F16C instructions), float16 gathers through a bfloat16 view, float16 scatters and int8
quantisation by numpy; the margin softmax's [batch, k] products, differences and maxima by numpy (exact
operations: Paddle's bits); loops compiled by numba for the sampled rows' gather and squared norms, the
centers' gradient pass and the sparse momentum step in place (float32, and float16 through its bits, rounded
as a cast rounds); and the two version tests, whether Paddle's index_select and matmul can write into a given
tensor (:data:`GATHER_WRITES_INTO`, :data:`MATMUL_WRITES_INTO`: 3.x can, 2.6 cannot). The row stores
(:mod:`plsc.loss.rows`, :mod:`plsc.loss.int8_rows`) call the row moves and the momentum step, the heads
(:mod:`plsc.loss.partial_fc`, :mod:`plsc.loss.streaming`) the norms, the cosine and softmax layers
(:mod:`plsc.loss.margin`) the passes; the math modules call these functions, never the tricks themselves.
Every trick runs in eager mode only: a static program (no memory to view) and other devices take the
references, which compute the same numbers wherever the tests need them to (static mode against eager); so do
the memory model's probes of a GPU's run (:func:`device_code_paths`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import inspect
import os
from types import SimpleNamespace

import cv2
import numpy as np
import paddle

# Paddle 3.x's index_select can write into a given tensor; 2.6's has no ``out`` parameter.
GATHER_WRITES_INTO = "out" in inspect.signature(paddle.index_select).parameters
# Likewise its matmul.
MATMUL_WRITES_INTO = "out" in inspect.signature(paddle.matmul).parameters
# int8 codes are symmetric: -128 is never used, so a row's largest element maps to +-127 exactly.
CODE_MAX = 127
# Rows per block when a matrix is copied to or from the host (checkpoints): a few MB whatever its size.
STATE_BLOCK_ROWS = 4096


def take_rows(matrix: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """``matrix[index]`` in the matrix's own dtype."""
    if matrix.dtype == paddle.float16:
        # Paddle's CPU gather has no float16 kernel; bfloat16 has one in 2.6 and 3.x and the same width, so
        # the bits move through a free view and are never interpreted as bfloat16 numbers.
        return paddle.view(paddle.gather(paddle.view(matrix, "bfloat16"), index), "float16")
    return paddle.gather(matrix, index)


def reference_take_rows(matrix: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """:func:`take_rows` by a float32 gather (no float16 gather kernel on the CPU): the whole matrix cast."""
    return paddle.gather(matrix.astype("float32"), index).astype(matrix.dtype)


def cast(tensor: paddle.Tensor, dtype) -> paddle.Tensor:
    """``tensor.astype(dtype)`` (``tensor`` itself when it has that dtype already).

    On CPU, float16 <-> float32 goes through OpenCV's conversion (F16C instructions), written straight into
    the new tensor's memory: IEEE round to nearest even, the same bits as numpy's and Paddle 3.x's casts
    (tested; Paddle 2.6's CPU cast is sometimes one ulp off), and 20x faster than Paddle's CPU kernel for
    float32 -> float16 (7 ms against 140 ms for 98 x 1024 x 512 elements, measured), which had made the
    float16 center update cost 0.4 s per step at 100,000 sampled rows (0.13 s with this).
    """
    if tensor.dtype == dtype:
        return tensor
    if is_cpu_and_contiguous(tensor) and {tensor.dtype, dtype} == {paddle.float16, paddle.float32}:
        out = paddle.empty(tensor.shape, dtype=dtype)
        source, target = host_view(tensor), host_view(out)
        # OpenCV spells float16 as int16 (CV_16S): the same bits, viewed.
        if dtype == paddle.float32:
            source = source.view(np.int16)
        else:
            target = target.view(np.int16)
        if cv2.convertFp16(source, target) is not target:
            raise RuntimeError("cv2.convertFp16 did not write into the given buffer")
        return out
    return tensor.astype(dtype)


def reference_cast(tensor: paddle.Tensor, dtype) -> paddle.Tensor:
    """:func:`cast` by Paddle's own kernel."""
    return tensor.astype(dtype)


def put_rows_(matrix: paddle.Tensor, index: paddle.Tensor, rows: paddle.Tensor) -> None:
    """``matrix[index] = rows`` in place (``index`` unique), ``rows`` already in the matrix's dtype."""
    if matrix.dtype == paddle.float16 and matrix.place.is_cpu_place():
        # Paddle's CPU scatter has no float16 kernel (nor same-width bfloat16/int16 ones); index_put_ has one
        # but expands the row ids to one index per element: 0.5 s and +690 MB per 100,000 x 512 rows. A
        # numpy view of the tensors' own memory copies the rows directly (0.02 s).
        host_view(matrix)[index.numpy()] = host_view(rows)
    else:
        paddle.scatter_(matrix, index, rows, overwrite=True)  # ~20x faster than index_put_ on CPU


def reference_put_rows_(matrix: paddle.Tensor, index: paddle.Tensor, rows: paddle.Tensor) -> None:
    """:func:`put_rows_` by Paddle's index_put_ (a float16 kernel on every device)."""
    paddle.index_put_(matrix, (index,), rows)


def squared_row_norms(rows: paddle.Tensor) -> paddle.Tensor:
    """[n] sum of squares of each row of a float32 [n, width] tensor.

    On the CPU in eager mode, a compiled pass (numba) over the tensor's own memory, summing in float64: 8 ms
    against 58 ms for Paddle's batched dot products at 100,000 x 512 (3.3.1, 2 threads, AVX-512; numpy's
    einsum, one thread, 15 ms). A static program (no memory to view) and other devices take the reference."""
    if on_host(rows):
        norms = np.empty(rows.shape[0], dtype=np.float32)
        _compiled_loops().squared_norms(host_view(rows), norms)
        return paddle.to_tensor(norms, place=rows.place)
    return reference_squared_row_norms(rows)


def reference_squared_row_norms(rows: paddle.Tensor) -> paddle.Tensor:
    """:func:`squared_row_norms` as n dot products (bmm): no [n, width] temporary, unlike square().sum()."""
    return paddle.bmm(rows.unsqueeze(1), rows.unsqueeze(2)).reshape([-1])


def gather_into(out: paddle.Tensor, matrix: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """``out[:] = matrix[index]`` as float32 (``out`` [len(index), width]; ``matrix`` float32, or float16 on
    the host); returns ``out``. On the CPU a compiled copy of the rows (numba): 25 ms against 41 ms for
    Paddle's index_select at 100,000 x 512 rows of a 1M-row float32 matrix (3.3.1, 2 threads, AVX-512); from
    float16, each value read through a table of the float32 of every float16 (exact): 63-68 ms against
    121-125 ms for the float16 gather and the cast apart (``plsc bench head --precision fp16``'s gather phase,
    norms included: 48-50 ms against 80-105). Elsewhere Paddle 3.x's index_select into ``out``
    (:data:`GATHER_WRITES_INTO`)."""
    if on_host(out) and on_host(matrix, dtype=matrix.dtype):
        loops = _compiled_loops()
        if matrix.dtype == paddle.float16:
            halves = host_view(matrix).view(np.uint16)
            loops.take_half_rows(halves, index.numpy(), host_view(out), loops.to_float)
        else:
            loops.take_rows(host_view(matrix), index.numpy(), host_view(out))
        return out
    paddle.index_select(matrix, index, out=out)
    return out


def matmul_into(out: paddle.Tensor | None, x: paddle.Tensor, y: paddle.Tensor, transpose_x: bool = False
                ) -> paddle.Tensor:
    """``matmul(x, y, transpose_x)``, in eager mode written into ``out`` (of the product's shape) when given:
    the same memory every step instead of fresh pages. Paddle 3.x's matmul writes into it
    (:data:`MATMUL_WRITES_INTO`), and with ``transpose_x`` also skips the transposed copy of ``x`` that addmm
    makes (62 ms against 97 ms for the centers' gradient at [128, 100000] x [128, 512], 3.3.1, AVX-512);
    Paddle 2.6's product is copied into it."""
    if out is None or not paddle.in_dynamic_mode():
        return paddle.matmul(x, y, transpose_x=transpose_x)
    if MATMUL_WRITES_INTO:
        return paddle.matmul(x, y, transpose_x=transpose_x, out=out)
    paddle.assign(paddle.matmul(x, y, transpose_x=transpose_x), output=out)
    return out


def subtract_scaled_rows_(matrix: paddle.Tensor, rows: paddle.Tensor, factors: paddle.Tensor
                          ) -> paddle.Tensor:
    """``matrix[j] -= factors[j] * rows[j]`` for each row j (float32 [n, width], ``factors`` [n]), in place
    when eager; returns the result. Products and differences are exact IEEE operations, so the compiled pass
    (numba, on the CPU: each row read once, no [n, width] temporary) gives Paddle's bits: 16 ms against 60 ms
    for the reference at 100,000 x 512 (3.3.1, 2 threads, AVX-512)."""
    if on_host(matrix, rows, factors):
        _compiled_loops().subtract_scaled_rows(host_view(matrix), host_view(rows), host_view(factors))
        return matrix
    return reference_subtract_scaled_rows_(matrix, rows, factors)


def reference_subtract_scaled_rows_(matrix: paddle.Tensor, rows: paddle.Tensor, factors: paddle.Tensor
                                    ) -> paddle.Tensor:
    """:func:`subtract_scaled_rows_` by Paddle's ops (any device, static programs)."""
    scaled_rows = rows * factors.unsqueeze(1)  # a [n, 1] operand: Paddle's fast broadcast along rows
    return matrix.subtract_(scaled_rows) if paddle.in_dynamic_mode() else matrix - scaled_rows


# Off inside device_code_paths(): then on_host() is false everywhere.
_HOST_PATHS = contextvars.ContextVar("plsc_host_paths", default=True)


@contextlib.contextmanager
def device_code_paths():
    """Inside, every fast path :func:`on_host` guards takes its reference, as on a device: the memory model
    (plsc.capacity) measures on the CPU what a GPU's run allocates, and the host's fast paths allocate
    otherwise (kept buffers, no gather or scatter in the update)."""
    token = _HOST_PATHS.set(False)
    try:
        yield
    finally:
        _HOST_PATHS.reset(token)


def on_host(*tensors: paddle.Tensor | None, dtype=paddle.float32) -> bool:
    """Whether numpy and the loops numba compiled may work on these in place of Paddle: CPU tensors of
    ``dtype``, contiguous, eager (None: no tensor), outside :func:`device_code_paths`."""
    return _HOST_PATHS.get() and paddle.in_dynamic_mode() and all(
        t.dtype == dtype and is_cpu_and_contiguous(t) for t in tensors if t is not None)


# The [batch, k] passes of the margin softmax. Products, differences and maxima are exact IEEE operations,
# the same bits whoever computes them, and numpy computes them over a CPU tensor's memory several times
# faster than Paddle's CPU kernels broadcast ([128, 100000] float32, 3.3.1, 2 threads, AVX-512: 3 ms against
# 18 ms for a product with a [k] or [batch, 1] operand, 2 ms against 28 ms for the row maxima). So eager and
# static programs (which take Paddle's ops) compute the same numbers. In place only: into a new tensor one
# numpy thread faults in the fresh pages (37 ms against 11 ms for Paddle's own scaling of the logits).


def multiply_(matrix: paddle.Tensor, factors: paddle.Tensor) -> paddle.Tensor:
    """``matrix * factors`` (``factors`` [cols] or [rows, 1]), into ``matrix`` when eager."""
    if on_host(matrix, factors):
        np.multiply(host_view(matrix), host_view(factors), out=host_view(matrix))
        return matrix
    return matrix.multiply_(factors) if paddle.in_dynamic_mode() else matrix * factors


def subtract_(matrix: paddle.Tensor, values: paddle.Tensor) -> paddle.Tensor:
    """``matrix - values`` (``values`` [cols] or [rows, 1]), into ``matrix`` when eager."""
    if on_host(matrix, values):
        np.subtract(host_view(matrix), host_view(values), out=host_view(matrix))
        return matrix
    return matrix.subtract_(values) if paddle.in_dynamic_mode() else matrix - values


def max_per_row(matrix: paddle.Tensor) -> paddle.Tensor:
    """``matrix.max(axis=1, keepdim=True)``, [rows, 1]."""
    if on_host(matrix):
        return paddle.to_tensor(host_view(matrix).max(axis=1, keepdims=True))
    return matrix.max(axis=1, keepdim=True)


def steps_in_place(weight: paddle.Tensor, velocity: paddle.Tensor, grad: paddle.Tensor | None,
                   velocity_scale: paddle.Tensor | None = None) -> bool:
    """Whether :func:`momentum_rows_in_place_` may step these on the host: a float32 or float16 weight, a
    velocity of its dtype (or int8 codes in their float16 container with float32 ``velocity_scale``), a
    float32 gradient (or none)."""
    velocity_dtype = weight.dtype if velocity_scale is None else paddle.float16
    return weight.dtype in (paddle.float32, paddle.float16) and on_host(grad, velocity_scale) and \
        on_host(weight, dtype=weight.dtype) and on_host(velocity, dtype=velocity_dtype)


def momentum_rows_in_place_(weight: paddle.Tensor, velocity: paddle.Tensor, index: paddle.Tensor,
                            grad: paddle.Tensor | None, lr: float, momentum: float, weight_decay: float,
                            grad_scale: float, velocity_scale: paddle.Tensor | None = None) -> None:
    """Paddle's Momentum with L2 decay on rows ``index`` (unique) of ``weight`` and ``velocity``, in place:
    ``g = grad * grad_scale + weight_decay * w; v = momentum * v + g; w = w - lr * v`` (``grad``: [len(index),
    width], None for zero), the same float32 operations in the same order as Paddle's CPU kernel, so the same
    bits (tested). float16 matrices are read exactly as float32 and their results rounded to the nearest
    float16, ties to even, as the gather-kernel-scatter walk casts them: the same bits again (tested). With
    ``velocity_scale``, ``velocity`` holds int8 codes (:mod:`plsc.loss.int8_rows`): each row is read as
    ``code * scale`` and requantised with :func:`quantize_on_host`'s float32 operations (tested to the bit
    against the walk). One pass over the rows where they lie, compiled by numba, in the threads plsc runs
    Paddle with (OMP_NUM_THREADS): 30 ms against 330 ms for a gather, Paddle's momentum kernel and two
    scatters at 100,000 x 512 float32 rows of a 1M-class matrix (3.3.1, 2 threads, AVX-512); float16, 142-152
    ms against 236-241 ms for the walk (``plsc bench head --precision fp16``'s update phase, whose hugepage
    malloc spares the random rows' TLB misses: 75-81 ms against 212).
    """
    grad_rows = np.zeros((0, weight.shape[1]), dtype=np.float32) if grad is None else host_view(grad)
    settings = (index.numpy(), grad_rows, grad is not None,
                *np.float32([lr, momentum, weight_decay, grad_scale]))
    loops = _compiled_loops()
    half_weight = weight.dtype == paddle.float16
    if velocity_scale is not None:
        # One kernel for either weight dtype: the one not stepped is an empty array of the other.
        weights = (np.empty((0, 0), np.float32), host_view(weight).view(np.uint16)) if half_weight else \
            (host_view(weight), np.empty((0, 0), np.uint16))
        codes = host_view(velocity).view(np.int8)
        loops.step_rows_int8_velocity(*weights, half_weight, codes, host_view(velocity_scale), *settings,
                                      loops.to_float)
    elif half_weight:
        halves = (host_view(weight).view(np.uint16), host_view(velocity).view(np.uint16))
        loops.step_half_rows(*halves, *settings, loops.to_float)
    else:
        loops.step_rows(host_view(weight), host_view(velocity), *settings)


@functools.cache
def _compiled_loops() -> SimpleNamespace:
    """The loops of :func:`momentum_rows_in_place_`, :func:`gather_into`, :func:`squared_row_norms` and
    :func:`subtract_scaled_rows_`: numba imported and each loop compiled on first use (its machine code
    cached beside this module), to run in the threads plsc runs Paddle with (OMP_NUM_THREADS)."""
    import numba

    threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

    # Paddle's Momentum with L2 decay on one element (weight w, velocity v, gradient g): its float32
    # operations in its order, the one formula every compiled step below runs. Returns the new velocity and
    # weight.
    @numba.njit(inline="always")
    def momentum_step(w, v, g, lr, momentum, weight_decay):
        v = v * momentum + (g + weight_decay * w)
        return v, w - lr * v

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def step_rows(weight, velocity, index, grad, has_grad, lr, momentum, weight_decay, grad_scale):
        zero = np.float32(0.0)
        for i in numba.prange(index.shape[0]):
            row = index[i]
            for j in range(weight.shape[1]):
                g = grad[i, j] * grad_scale if has_grad else zero
                velocity[row, j], weight[row, j] = momentum_step(weight[row, j], velocity[row, j], g, lr,
                                                                 momentum, weight_decay)

    # Reassociation lets the sum run in vector lanes (in float64: any order rounds to about the same float32).
    @numba.njit(parallel=True, cache=True, boundscheck=False, fastmath={"reassoc"})
    def squared_norms(rows, out):
        for i in numba.prange(rows.shape[0]):
            total = 0.0
            for j in range(rows.shape[1]):
                value = np.float64(rows[i, j])
                total += value * value
            out[i] = total

    # numba has no float16 arithmetic on the CPU: float16 matrices are viewed as their bits, read through the
    # table of every float16's float32 (exact, 256 KB) and written back by half_bits.
    to_float = np.arange(1 << 16).astype(np.uint16).view(np.float16).astype(np.float32)

    @numba.njit(inline="always")
    def half_bits(value, value_bits):
        """The float16 nearest the float32 ``value`` (ties to even), as bits; ``value_bits``: its bits."""
        sign = np.uint16((value_bits >> 16) & 0x8000)
        magnitude = value_bits & 0x7FFFFFFF
        if magnitude > 0x7F800000:  # NaN stays NaN, quiet, with the top of its payload
            return sign | np.uint16(0x7E00 | ((magnitude >> 13) & 0x1FF))
        if magnitude >= 0x477FF000:  # at or past 65520, half-way above the largest float16: infinity
            return sign | np.uint16(0x7C00)
        if magnitude >= 0x38800000:  # 2^-14 and up: a normal float16
            # Rebiased exponent and the top 10 fraction bits, then the 13 dropped bits round to nearest,
            # ties to even (a carry out of the fraction steps the exponent, as it should).
            half = (magnitude - 0x38000000) >> 13
            dropped = magnitude & 0x1FFF
            half += 1 if dropped + (half & 1) > 0x1000 else 0  # above half-way, or half-way from an odd half
            return sign | np.uint16(half)
        # Below 2^-14: a subnormal float16 (or 0) is a whole multiple of 2^-24; the product is exact and
        # rint rounds to nearest, ties to even (1024 is the smallest normal, correctly).
        return sign | np.uint16(np.rint(abs(value) * np.float32(16777216.0)))

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def step_half_rows(weight, velocity, index, grad, has_grad, lr, momentum, weight_decay, grad_scale,
                       to_float):
        zero = np.float32(0.0)
        width = weight.shape[1]
        for i in numba.prange(index.shape[0]):
            row = index[i]
            stepped = np.empty(2 * width, dtype=np.float32)  # velocity, then weight, in float32
            for j in range(width):
                g = grad[i, j] * grad_scale if has_grad else zero
                stepped[j], stepped[width + j] = momentum_step(to_float[weight[row, j]],
                                                               to_float[velocity[row, j]], g, lr, momentum,
                                                               weight_decay)
            stepped_bits = stepped.view(np.uint32)
            for j in range(width):
                velocity[row, j] = half_bits(stepped[j], stepped_bits[j])
                weight[row, j] = half_bits(stepped[width + j], stepped_bits[width + j])

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def step_rows_int8_velocity(weight, half_weight_bits, half_weight, codes, scales, index, grad, has_grad,
                                lr, momentum, weight_decay, grad_scale, to_float):
        zero, code_max = np.float32(0.0), np.float32(CODE_MAX)
        width = codes.shape[1]
        for i in numba.prange(index.shape[0]):
            row = index[i]
            stepped = np.empty(2 * width, dtype=np.float32)  # velocity, then weight, in float32
            scale, absmax, has_nan = scales[row, 0], zero, False
            for j in range(width):
                w = to_float[half_weight_bits[row, j]] if half_weight else weight[row, j]
                g = grad[i, j] * grad_scale if has_grad else zero
                v, stepped[width + j] = momentum_step(w, np.float32(codes[row, j]) * scale, g, lr, momentum,
                                                      weight_decay)
                stepped[j] = v
                absmax = max(absmax, abs(v))
                has_nan |= v != v
            # Requantised as quantize_on_host does: scale = max |v| / 127, codes floor(v / scale + 0.5)
            # (a zero row keeps scale 0 and codes 0; a NaN makes the scale NaN, as numpy's maximum does).
            new_scale = np.float32(np.nan) if has_nan else absmax / code_max
            divisor = new_scale if absmax > zero else np.float32(1.0)
            scales[row, 0] = new_scale
            stepped_bits = stepped.view(np.uint32)
            for j in range(width):
                codes[row, j] = np.int8(np.floor(stepped[j] / divisor + np.float32(0.5)))
                if half_weight:
                    half_weight_bits[row, j] = half_bits(stepped[width + j], stepped_bits[width + j])
                else:
                    weight[row, j] = stepped[width + j]

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def take_half_rows(matrix, index, out, to_float):
        for i in numba.prange(index.shape[0]):
            row = index[i]
            for j in range(matrix.shape[1]):
                out[i, j] = to_float[matrix[row, j]]

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def take_rows(matrix, index, out):
        for i in numba.prange(index.shape[0]):
            row = index[i]
            for j in range(matrix.shape[1]):
                out[i, j] = matrix[row, j]

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def subtract_scaled_rows(matrix, rows, factors):
        for i in numba.prange(matrix.shape[0]):
            factor = factors[i]
            for j in range(matrix.shape[1]):
                matrix[i, j] -= factor * rows[i, j]

    return SimpleNamespace(step_rows=step_rows, step_half_rows=step_half_rows,
                           step_rows_int8_velocity=step_rows_int8_velocity, take_half_rows=take_half_rows,
                           half_bits=half_bits, to_float=to_float, take_rows=take_rows,
                           squared_norms=squared_norms, subtract_scaled_rows=subtract_scaled_rows)


def is_cpu_and_contiguous(tensor: paddle.Tensor) -> bool:
    """Whether :func:`host_view` may view ``tensor`` (Paddle 2.6 slices are copies, 3.x ones may be views)."""
    return tensor.place.is_cpu_place() and tensor.is_contiguous()


def host_view(tensor: paddle.Tensor) -> np.ndarray:
    """A writable numpy array over a contiguous CPU tensor's own memory (no copy); valid while it lives."""
    dtype = np.dtype(str(tensor.dtype).split(".")[-1])
    count = int(np.prod(tensor.shape))
    memory = (ctypes.c_byte * (count * dtype.itemsize)).from_address(tensor.data_ptr())
    return np.ctypeslib.as_array(memory).view(dtype).reshape(tensor.shape)


def host_blocks(tensor: paddle.Tensor, block_rows: int = STATE_BLOCK_ROWS):
    """The tensor's rows as numpy blocks: views of its own memory on the CPU, one block's host copy at a time
    from another device. Valid until the tensor changes."""
    whole = host_view(tensor) if is_cpu_and_contiguous(tensor) else None
    for start in range(0, tensor.shape[0], block_rows):
        yield whole[start : start + block_rows] if whole is not None else \
            tensor[start : start + block_rows].numpy()


def copy_rows_into(tensor: paddle.Tensor, source, block_rows: int = STATE_BLOCK_ROWS) -> None:
    """``tensor[:] = source`` a block of rows at a time, cast to the tensor's dtype (numpy's rounding):
    ``source`` an array, or an object whose ``blocks(n)`` yields ``(first row, rows)``
    (:class:`plsc.checkpoint.shards.RowPieces`)."""
    target = host_view(tensor) if is_cpu_and_contiguous(tensor) else None
    for start, rows in source_blocks(source, block_rows):
        if target is not None:
            target[start : start + len(rows)] = rows
        else:
            tensor[start : start + len(rows)] = paddle.to_tensor(np.asarray(rows)).astype(tensor.dtype)


def source_blocks(source, block_rows: int = STATE_BLOCK_ROWS):
    """``(first row, rows)`` of an array, or of an object with its own ``blocks(n)``."""
    if hasattr(source, "blocks"):
        yield from source.blocks(block_rows)
    else:
        for start in range(0, len(source), block_rows):
            yield start, source[start : start + block_rows]


def quantize_on_host(rows: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """float32 ``rows`` [n, w] (on the CPU, contiguous) -> int8 codes in a float16 container [n, w / 2] and
    scales [n, 1] (:mod:`plsc.loss.int8_rows`), by numpy on the tensor's own memory: the same float32
    operations as :func:`reference_quantize` (IEEE division, add, floor), so the same codes, in 2.8 ms against
    7.3 ms at 4096 x 512 (3.3.1; the row maximum and the division by a [n, 1] column are slow paths of
    Paddle's CPU kernels)."""
    values = host_view(rows)
    absmax = np.abs(values).max(axis=1, keepdims=True)
    scale = absmax / np.float32(CODE_MAX)
    codes = values / np.where(absmax > 0, scale, np.float32(1))
    codes += np.float32(0.5)
    container = paddle.empty([rows.shape[0], rows.shape[1] // 2], dtype="float16")
    host_view(container).view(np.int8)[...] = np.floor(codes, out=codes)  # whole numbers in [-127, 127]
    return container, paddle.to_tensor(scale, place=rows.place)


def reference_quantize(rows: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """:func:`quantize_on_host` by Paddle's ops (any device): ``scale = max |row| / 127``, codes
    ``floor(row / scale + 0.5)``."""
    absmax = rows.abs().max(axis=1, keepdim=True)
    # A tensor divisor: Paddle 2.6 multiplies by the reciprocal of a Python number (one ulp off numpy).
    scale = absmax / paddle.full_like(absmax, CODE_MAX)
    # An all-zero row keeps scale 0 and codes 0 (dividing by 1 instead of 0).
    divisor = paddle.where(absmax > 0, scale, paddle.ones_like(scale))
    codes = paddle.floor(rows / divisor + 0.5)
    container = paddle.empty([rows.shape[0], rows.shape[1] // 2], dtype="float16")
    paddle.assign(codes.astype("int8"), output=paddle.view(container, "int8"))
    return container, scale


def dequantize_on_host(container: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """Codes in a float16 container [n, w / 2] times their scales [n, 1] -> float32 rows [n, w], by numpy on
    the tensors' memory (CPU, contiguous): the same products without Paddle's slow [n, 1] broadcast."""
    rows = paddle.empty([container.shape[0], container.shape[1] * 2], dtype="float32")
    np.multiply(host_view(container).view(np.int8), host_view(scale), out=host_view(rows))
    return rows


def reference_dequantize(container: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """:func:`dequantize_on_host` by Paddle's ops (any device)."""
    return paddle.view(container, "int8").astype("float32").multiply_(scale)
