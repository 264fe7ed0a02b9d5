"""The row stores and their backend: each CPU speed trick of plsc.loss.row_backend against its plain
reference in Paddle ops, and every store (float32, float16, int8) against numpy through one protocol."""

import numpy as np
import paddle
import pytest

from plsc.loss import row_backend
from plsc.loss import rows as rows_module
from plsc.loss.rows import FloatRows, new_rows, row_store

RNG = np.random.default_rng(5)
# Values across float16's range, subnormals and round-to-even ties included.
VALUES = np.concatenate([RNG.standard_normal(600) * 3,
                         [6.1e-5, 5.96e-8, 1e-9, 65504.0, 2049.0, 2051.0, -0.0, 0.0]])


def bits(tensor: paddle.Tensor) -> np.ndarray:
    array = tensor.numpy()
    return array.view({2: np.uint16, 4: np.uint32}[array.itemsize])


@pytest.mark.parametrize("source, target", [("float32", "float16"), ("float16", "float32")])
def test_cast_matches_numpy_and_paddle_kernel(source, target):
    values = VALUES.astype(np.float32).astype(source).reshape(-1, 8)
    fast = row_backend.cast(paddle.to_tensor(values), getattr(paddle, target))  # as the stores pass it
    np.testing.assert_array_equal(bits(fast), values.astype(target).view(bits(fast).dtype))
    if paddle.__version__.startswith("2.6") and target == "float16":
        pytest.skip("Paddle 2.6's CPU cast to float16 is sometimes one ulp off numpy: numpy is the reference")
    reference = row_backend.reference_cast(paddle.to_tensor(values), getattr(paddle, target))
    np.testing.assert_array_equal(bits(fast), bits(reference))


def test_float16_gather_and_scatter_match_their_references():
    matrix = VALUES[:608].astype(np.float16).reshape(76, 8)
    index = paddle.to_tensor(np.array([5, 0, 75, 33, 6]))
    tensor = paddle.to_tensor(matrix)
    np.testing.assert_array_equal(bits(row_backend.take_rows(tensor, index)),
                                  bits(row_backend.reference_take_rows(tensor, index)))
    rows = paddle.to_tensor(RNG.standard_normal((5, 8)).astype(np.float16))
    fast, reference = paddle.to_tensor(matrix), paddle.to_tensor(matrix)
    row_backend.put_rows_(fast, index, rows)
    row_backend.reference_put_rows_(reference, index, rows)
    np.testing.assert_array_equal(bits(fast), bits(reference))
    expected = matrix.copy()
    expected[index.numpy()] = rows.numpy()
    np.testing.assert_array_equal(bits(fast), expected.view(np.uint16))


@pytest.mark.parametrize("compiled", [True, False])
def test_gather_into_a_given_tensor_matches_a_plain_gather(monkeypatch, compiled):
    """The compiled copy of the rows (on the CPU) and, off the host, Paddle 3.x's index_select into ``out``
    (Paddle 2.6 gathers into a new tensor there)."""
    if not compiled:
        monkeypatch.setattr(row_backend, "on_host", lambda *tensors: False)
        if not row_backend.GATHER_WRITES_INTO:
            pytest.skip("Paddle 2.6's index_select has no out parameter: the stores gather into new tensors")
    matrix = paddle.to_tensor(RNG.standard_normal((40, 8)).astype(np.float32))
    index = paddle.to_tensor(np.array([3, 39, 0, 7]))
    out = paddle.empty([4, 8], dtype="float32")
    store = FloatRows(matrix)
    assert store.gathers_into
    with monkeypatch.context() as patch:
        if compiled:  # Paddle's gather must not run
            patch.setattr(paddle, "index_select", None)
        got = store.gather(index, out)
    assert got.data_ptr() == out.data_ptr()
    np.testing.assert_array_equal(got.numpy(), matrix.numpy()[[3, 39, 0, 7]])


def test_writes_into_a_given_tensor_exactly_on_paddle_3():
    """The version test behind the kept buffers: Paddle 3.x's index_select and matmul take ``out``, 2.6's do
    not (which then gather and multiply into new tensors)."""
    major = int(paddle.__version__.split(".")[0])
    assert row_backend.GATHER_WRITES_INTO == row_backend.MATMUL_WRITES_INTO == (major >= 3)


def test_row_norms_match_float64_sums_and_the_reference(monkeypatch):
    rows = (RNG.standard_normal((300, 64)) * RNG.uniform(1e-3, 10, (300, 1))).astype(np.float32)
    tensor = paddle.to_tensor(rows)
    with monkeypatch.context() as patch:  # a CPU tensor in eager mode takes the numpy path
        patch.setattr(row_backend, "reference_squared_row_norms", None)
        fast = row_backend.squared_row_norms(tensor).numpy()
    exact = (rows.astype(np.float64) ** 2).sum(axis=1)
    # float32 sums of 64 squares: within 64 roundings (the bound; measured over 20 draws: 1.8e-7 numpy,
    # 4.4e-7 the reference).
    np.testing.assert_allclose(fast, exact, rtol=64 * 2**-24)
    reference = row_backend.reference_squared_row_norms(tensor).numpy()
    np.testing.assert_allclose(reference, exact, rtol=64 * 2**-24)
    assert fast.shape == (300,) and fast.dtype == np.float32


@pytest.mark.parametrize("operand", ["columns", "rows"])
def test_the_margin_softmax_passes_on_the_host_are_paddles_ops_to_the_bit(monkeypatch, operand):
    """numpy's products, differences and maxima over a tensor's memory against Paddle's own kernels (what
    a static program runs), with a [cols] and a [rows, 1] operand, zeros and subnormals included."""
    matrix = (RNG.standard_normal((64, 300)) * 30).astype(np.float32)
    matrix[3, :5] = [0.0, -0.0, 1e-40, -1e-39, 3e-45]
    other = RNG.standard_normal(300 if operand == "columns" else (64, 1)).astype(np.float32)
    results = {}
    for on_host in (True, False):
        with monkeypatch.context() as patch:
            if not on_host:
                patch.setattr(row_backend, "on_host", lambda *tensors: False)
            a, b = paddle.to_tensor(matrix), paddle.to_tensor(other)
            product = row_backend.multiply_(a, b)
            assert product.data_ptr() == a.data_ptr()  # in place when eager, either way
            results[on_host] = [bits(product), bits(row_backend.subtract_(paddle.to_tensor(matrix), b)),
                                bits(row_backend.max_per_row(paddle.to_tensor(matrix)))]
    for fast, reference in zip(results[True], results[False], strict=True):
        np.testing.assert_array_equal(fast, reference)
    np.testing.assert_array_equal(results[True][0].view(np.float32), matrix * other)
    np.testing.assert_array_equal(results[True][2].view(np.float32), matrix.max(axis=1, keepdims=True))


@pytest.mark.parametrize("transpose_x", [False, True])
def test_a_matmul_into_a_given_tensor_is_a_matmul(transpose_x):
    x = paddle.to_tensor(RNG.standard_normal((20, 30)).astype(np.float32))
    y = paddle.to_tensor(RNG.standard_normal((20 if transpose_x else 30, 8)).astype(np.float32))
    out = paddle.empty([30 if transpose_x else 20, 8], dtype="float32")
    got = row_backend.matmul_into(out, x, y, transpose_x)
    assert got.data_ptr() == out.data_ptr()
    expected = (x.numpy().T if transpose_x else x.numpy()).astype(np.float64) @ y.numpy()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_subtracting_scaled_rows_is_paddles_ops_to_the_bit(monkeypatch):
    """The compiled pass of the centers' gradient against Paddle's ops (what a static program runs) and
    numpy's float32 arithmetic, with a zero factor (a floored norm) keeping its row."""
    matrix = RNG.standard_normal((300, 64)).astype(np.float32)
    rows = (RNG.standard_normal((300, 64)) * RNG.uniform(1e-2, 10, (300, 1))).astype(np.float32)
    factors = RNG.standard_normal(300).astype(np.float32)
    factors[7] = 0.0
    tensors = [paddle.to_tensor(a) for a in (matrix, rows, factors)]
    with monkeypatch.context() as patch:  # a CPU tensor in eager mode takes the compiled pass
        patch.setattr(row_backend, "reference_subtract_scaled_rows_", None)
        fast = row_backend.subtract_scaled_rows_(*tensors)
    assert fast.data_ptr() == tensors[0].data_ptr()  # in place
    copies = [paddle.to_tensor(a) for a in (matrix, rows, factors)]
    reference = row_backend.reference_subtract_scaled_rows_(*copies)
    np.testing.assert_array_equal(bits(fast), bits(reference))
    np.testing.assert_array_equal(fast.numpy(), matrix - factors[:, None] * rows)
    np.testing.assert_array_equal(fast.numpy()[7], matrix[7])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("grad_scale, with_grad", [(1.0, True), (0.125, True), (1.0, False)])
def test_momentum_in_place_is_the_gather_kernel_scatter_walk_to_the_bit(monkeypatch, grad_scale, with_grad,
                                                                         dtype):
    """The compiled in-place step against the walk through Paddle's own momentum kernel (the reference),
    on a matrix whose sampled rows are scattered and unsorted, with a gradient scale and without gradient
    (the dense mode's decay of unsampled rows); float16 matrices are read as float32 and rounded back."""
    weight = RNG.standard_normal((500, 48)).astype(dtype)
    velocity = (RNG.standard_normal((500, 48)) * 0.1).astype(dtype)
    index = paddle.to_tensor(RNG.permutation(500)[:130])
    grad = paddle.to_tensor(RNG.standard_normal((130, 48)).astype(np.float32)) if with_grad else None
    settings = dict(lr=0.3, momentum=0.9, weight_decay=5e-4, grad_scale=grad_scale)
    stepped = {}
    for in_place in (True, False):
        stores = FloatRows(paddle.to_tensor(weight)), FloatRows(paddle.to_tensor(velocity))
        with monkeypatch.context() as patch:
            if in_place:  # the walk must not run
                patch.setattr(rows_module, "momentum_", None)
            else:
                patch.setattr(rows_module, "steps_in_place", lambda *tensors: False)
            rows_module.lazy_update(*stores, index, grad, **settings)
        stepped[in_place] = [bits(store.tensor) for store in stores]
    for fast, reference in zip(stepped[True], stepped[False], strict=True):
        np.testing.assert_array_equal(fast, reference)
    untouched = np.setdiff1d(np.arange(500), index.numpy())
    np.testing.assert_array_equal(stepped[True][0].view(dtype)[untouched], weight[untouched])
    # And against numpy's float32 arithmetic, the formula of Paddle's Momentum with L2 decay, rounded to the
    # storage's dtype.
    rows = index.numpy()
    w, v = weight[rows].astype(np.float32), velocity[rows].astype(np.float32)
    g = grad.numpy() * np.float32(grad_scale) if with_grad else np.zeros((130, 48), np.float32)
    v = v * np.float32(0.9) + (g + np.float32(5e-4) * w)
    np.testing.assert_array_equal(stepped[True][1].view(dtype)[rows], v.astype(dtype))
    np.testing.assert_array_equal(stepped[True][0].view(dtype)[rows], (w - np.float32(0.3) * v).astype(dtype))


@pytest.mark.parametrize("weight_dtype", ["float32", "float16"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_int8_velocity_in_place_is_the_walk_to_the_bit(monkeypatch, weight_dtype, with_grad):
    """The compiled step of a weight with int8 velocity (codes read as code * scale, requantised as
    quantize_on_host does) against the walk: dequantised block, Paddle's kernel, requantised scatter; a row
    whose velocity steps to zero keeps scale 0 and codes 0."""
    weight = RNG.standard_normal((300, 32)).astype(weight_dtype)
    weight[17] = 0.0
    velocity = (RNG.standard_normal((300, 32)) * 0.1).astype(np.float32)
    velocity[17] = 0.0
    index = paddle.to_tensor(np.concatenate([[17], RNG.permutation(np.delete(np.arange(300), 17))[:79]]))
    grad = RNG.standard_normal((80, 32)).astype(np.float32)
    grad[0] = 0.0
    settings = dict(lr=0.3, momentum=0.9, weight_decay=5e-4, grad_scale=0.5)
    stepped = {}
    for in_place in (True, False):
        store = new_rows(300, 32, "int8")
        store.write_block_(0, paddle.to_tensor(velocity))
        weights = FloatRows(paddle.to_tensor(weight))
        with monkeypatch.context() as patch:
            if in_place:  # the walk must not run
                patch.setattr(rows_module, "momentum_", None)
            else:
                patch.setattr(rows_module, "steps_in_place", lambda *tensors: False)
            rows_module.lazy_update(weights, store, index, paddle.to_tensor(grad) if with_grad else None,
                                    **settings)
        stepped[in_place] = [bits(weights.tensor), bits(store.codes), bits(store.scale)]
    for fast, reference in zip(stepped[True], stepped[False], strict=True):
        np.testing.assert_array_equal(fast, reference)
    assert not stepped[True][2].view(np.float32)[17].any() and not stepped[True][1][17].any()


def test_the_compiled_rounding_to_float16_is_numpys_for_every_kind_of_value():
    """The float32 -> float16 rounding of the in-place float16 step (half_bits) against numpy's cast: every
    float16 value, the midpoints between neighbours (ties to even) and the floats next to them, subnormals,
    the overflow threshold, infinities, signed zeros, and random values across float32's range."""
    loops = row_backend._compiled_loops()
    halves = np.arange(1 << 16).astype(np.uint16).view(np.float16)
    magnitudes = np.unique(np.abs(halves[np.isfinite(halves)]).astype(np.float32))
    midpoints = ((magnitudes[1:].astype(np.float64) + magnitudes[:-1]) / 2).astype(np.float32)
    beside = [np.nextafter(midpoints, np.float32(direction)) for direction in (0, np.inf)]
    spread = RNG.standard_normal(20000) * np.exp(RNG.uniform(-110, 88, 20000))
    special = [65504, 65519.996, 65520, 65536, np.inf, 0.0, 2**-24, 2**-25, 3 * 2**-26, 2**-26, 1e-40, 2**-14,
               np.nextafter(np.float32(2**-14), np.float32(0))]
    values = np.concatenate([magnitudes, midpoints, *beside, spread, special]).astype(np.float32)
    values = np.concatenate([values, -values])
    got = np.array([loops.half_bits(value, value_bits) for value, value_bits
                    in zip(values.tolist(), values.view(np.uint32).tolist(), strict=True)], dtype=np.uint16)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, values.astype(np.float16).view(np.uint16))
    nan = np.float32(np.nan)
    assert np.isnan(np.uint16(loops.half_bits(nan, nan.view(np.uint32))).view(np.float16))


def test_device_code_paths_turn_every_host_path_off():
    """What the memory model probes for a GPU (plsc.capacity): inside, nothing takes a host path."""
    matrix = paddle.to_tensor(np.ones((4, 8), np.float32))
    assert row_backend.on_host(matrix) and row_backend.steps_in_place(matrix, matrix, None)
    with row_backend.device_code_paths():
        assert not row_backend.on_host(matrix)
        assert not row_backend.steps_in_place(matrix, matrix, None)
        assert not FloatRows(paddle.to_tensor(np.ones((4, 8), np.float16))).gathers_into
    assert row_backend.on_host(matrix)


def test_float16_rows_gather_into_a_float32_buffer_exactly():
    matrix = VALUES[:608].astype(np.float16).reshape(76, 8)
    index = paddle.to_tensor(np.array([5, 0, 75, 33, 6]))
    out = paddle.empty([5, 8], dtype="float32")
    store = FloatRows(paddle.to_tensor(matrix))
    assert store.gathers_into
    got = store.gather(index, out)
    assert got.data_ptr() == out.data_ptr()
    np.testing.assert_array_equal(got.numpy(), matrix[index.numpy()].astype(np.float32))


def test_int8_quantisation_on_the_host_matches_paddles_ops():
    rows = (RNG.standard_normal((33, 16)) * RNG.uniform(1e-3, 50, (33, 1))).astype(np.float32)
    rows[4] = 0.0
    rows[7] = np.float32([127, 2.5, -2.5, 0.5, -0.5, 1.5, 126.5, -126.5] * 2)  # every code a tie
    host = row_backend.quantize_on_host(paddle.to_tensor(rows))
    reference = row_backend.reference_quantize(paddle.to_tensor(rows))
    for a, b in zip(host, reference, strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))
    np.testing.assert_array_equal(row_backend.dequantize_on_host(*host).numpy(),
                                  row_backend.reference_dequantize(*reference).numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_every_store_gathers_scatters_and_moves_blocks_as_numpy(dtype):
    store = row_store(new_rows(30, 8, dtype))
    assert store.dtype == dtype and list(store.shape) == [30, 8]
    rows = RNG.standard_normal((6, 8)).astype(np.float32)
    index = np.array([29, 0, 4, 17, 3, 8])
    store.scatter_(paddle.to_tensor(index), paddle.to_tensor(rows))
    expected = np.zeros((30, 8), dtype=np.float32)
    expected[index] = rows
    # int8: half a quantisation step of each row; float16: its rounding; float32: exact.
    tolerance = {"float32": 0, "float16": 1e-3, "int8": 1 / 127 * 3.5}[dtype]
    gathered = store.gather(paddle.to_tensor(index)).numpy()
    assert gathered.dtype == np.float32
    np.testing.assert_allclose(gathered, rows, atol=tolerance * np.abs(rows).max(), rtol=0)
    np.testing.assert_array_equal(store.read_block(0, 30).numpy()[index], gathered)
    store.write_block_(10, paddle.to_tensor(rows[:3]))
    written = store.gather(paddle.to_tensor(np.arange(10, 13))).numpy()
    np.testing.assert_array_equal(store.read_block(10, 13).numpy(), written)
    np.testing.assert_allclose(written, rows[:3], atol=tolerance * np.abs(rows).max(), rtol=0)
    assert not store.read_block(0, 30).numpy()[[1, 2, 5, 6, 7, 9]].any()  # untouched rows stay zero
    assert store.float_tensors() and all(t.dtype != paddle.int8 for t in store.tensors())


def test_a_tensor_is_wrapped_and_a_store_is_itself():
    tensor = paddle.zeros([4, 2])
    assert isinstance(row_store(tensor), FloatRows) and row_store(tensor).tensor is tensor
    int8 = new_rows(4, 2, "int8")
    assert row_store(int8) is int8
