"""The native hot path of aotc.sdpa_vector: aotc._ext.CallTable keys calls by their arguments'
signature, and aotc._ext.CudaPlan runs a plan's conversions and launches over slots.

Plans without launches run here (MLX's CPU); a launch reached on this machine stops at the
stream check, which shows which inputs the plan handed it. Launches that run are checked on
the GPU machine (tests/gpu/test_sdpa_mlx.py goes through this path for every call).
"""

from __future__ import annotations

import re

import pytest

mx = pytest.importorskip("mlx.core")


@pytest.fixture(scope="module")
def ext():
    from aotc.runtime.cuda import extension

    return extension()


def _cast_plan(ext, num_args=3, slot=0, dtype=None):
    plan = ext.CudaPlan(num_args)
    plan.astype(slot, dtype or mx.float16)
    plan.set_output(slot)
    return plan


def test_table_serves_the_signature_it_was_given(ext):
    table = ext.CallTable()
    plan = _cast_plan(ext)
    x = mx.arange(4.0)
    assert table(x, None, 0.5) is None  # nothing filed yet
    assert table.add(plan, x, None, 0.5) is True
    assert len(table) == 1
    y = mx.arange(4.0) * 3
    out = table(y, None, 0.5)
    assert out.dtype == mx.float16
    assert out.tolist() == [0.0, 3.0, 6.0, 9.0]  # this call's array, not the filed one's


@pytest.mark.parametrize(
    "other",
    [
        (mx.arange(5.0), None, 0.5),  # shape
        (mx.arange(4), None, 0.5),  # dtype
        (mx.arange(4.0).reshape(2, 2), None, 0.5),  # rank
        (mx.arange(4.0), None, 0.25),  # scale
        (mx.arange(4.0), "causal", 0.5),  # None against a string
        (mx.arange(4.0), mx.arange(4.0), 0.5),  # None against an array
        (mx.arange(4.0), None),  # argument count
        (mx.arange(4.0), None, 1),  # int against float
    ],
)
def test_table_misses_any_other_signature(ext, other):
    table = ext.CallTable()
    table.add(_cast_plan(ext), mx.arange(4.0), None, 0.5)
    assert table(*other) is None


def test_table_keys_strings_by_value_and_refuses_unknown_types(ext):
    table = ext.CallTable()
    x = mx.arange(4.0)
    table.add(_cast_plan(ext), x, "causal", 0.5)
    assert table(x, "causal", 0.5) is not None
    assert table(x, "causa", 0.5) is None
    assert table(x, "causal" + "x" * 20, 0.5) is None
    assert table.add(_cast_plan(ext), x, object(), 0.5) is False
    assert table(x, object(), 0.5) is None


def test_table_keys_the_default_device(ext):
    table = ext.CallTable()
    x = mx.arange(4.0)
    table.add(_cast_plan(ext), x, None, 0.5)
    other = mx.gpu if mx.default_device() == mx.cpu else mx.cpu
    previous = mx.default_device()
    try:
        mx.set_default_device(other)
    except (RuntimeError, ValueError):
        pytest.skip(f"MLX has no {other} device here")
    try:
        assert table(x, None, 0.5) is None
    finally:
        mx.set_default_device(previous)
    assert table(x, None, 0.5) is not None


def test_table_limit_and_clear(ext):
    table = ext.CallTable(2)
    for n in (1, 2, 3):
        table.add(_cast_plan(ext), mx.zeros((n,)), None, 0.5)
    assert len(table) == 1  # full at the third signature: started over
    assert table(mx.zeros((3,)), None, 0.5) is not None
    table.clear()
    assert len(table) == 0 and table(mx.zeros((3,)), None, 0.5) is None


def test_plan_conversions(ext):
    plan = ext.CudaPlan(2)
    plan.astype(1, mx.float16)
    plan.broadcast_to(1, [2, 3])
    plan.set_output(1)
    out = plan(None, mx.array([1.0, 2.0, 3.0]))
    assert out.shape == (2, 3) and out.dtype == mx.float16
    assert out.tolist() == [[1.0, 2.0, 3.0]] * 2
    assert plan(None, mx.zeros((2, 3), dtype=mx.float16)).shape == (2, 3)
    assert plan.num_args == 2


def test_plan_rejects_wiring_errors(ext):
    prepared = ext.PreparedLaunch(
        ext.CudaImage(b"\x00" * 16), "k", [[4]], [mx.float32], (1, 1, 1), (32, 1, 1), 0, b"", []
    )
    plan = ext.CudaPlan(2)
    with pytest.raises(ValueError, match="reads slot 2, which no argument or earlier launch"):
        plan.launch(prepared, [0, 2], [2])
    with pytest.raises(ValueError, match="writes slot 1, which already holds"):
        plan.launch(prepared, [0], [1])
    with pytest.raises(ValueError, match="has 1 outputs, but 2 output slots"):
        plan.launch(prepared, [0], [2, 3])
    with pytest.raises(ValueError, match="slot 5 is not one of the 2 arguments"):
        plan.launch(prepared, [0], [2], [5])
    with pytest.raises(ValueError, match="slot 2 is not one of the 2 arguments"):
        plan.astype(2, mx.float16)
    with pytest.raises(ValueError, match="output slot 4 is never filled"):
        plan.set_output(4)
    with pytest.raises(ValueError, match="no output slot"):
        plan(None, None)
    plan.launch(prepared, [0], [2])
    plan.set_output(2)
    with pytest.raises(ValueError, match="takes 2 arguments, got 1"):
        plan(mx.arange(4.0))
    with pytest.raises(ValueError, match="needs slot 0, but that argument is None"):
        plan(None, None)


def test_plan_gives_unread_inputs_no_array(ext):
    """An unread input (an absent mask's or sinks' place) takes no input of the primitive:
    MLX pays for each input at every call. One the kernel takes strides of keeps its array."""
    image = ext.CudaImage(b"\x00" * 16)
    one = ([[4]], [mx.float32], (1, 1, 1), (32, 1, 1), 0, b"")
    plan = ext.CudaPlan(2)
    plan.launch(ext.PreparedLaunch(image, "k", *one, [0], [2, 3]), [0, 1, 0, 0], [2])
    assert plan.primitive_sources == [[[0, 1, ext.NO_SOURCE, ext.NO_SOURCE]]]
    strided = ext.CudaPlan(2)
    strided.launch(ext.PreparedLaunch(image, "k", *one, [0, 2], [2]), [0, 1, 0], [2])
    assert strided.primitive_sources == [[[0, 1, 2]]]
    # In a chain too: the second launch's unread place takes none of the chain's inputs.
    chain = ext.CudaPlan(2)
    chain.launch(ext.PreparedLaunch(image, "a", *one, []), [0], [2])
    chain.launch(ext.PreparedLaunch(image, "b", *one, [], [1], [], True), [2, 1], [3])
    assert chain.primitive_sources == [[[0], [~0, ext.NO_SOURCE]]]
    assert ext.NO_SOURCE == -(2**31)


def test_plan_gives_scratch_outputs_no_slot(ext):
    """A launch's scratch outputs are the kernel's own: the plan wires its other outputs only."""
    prepared = ext.PreparedLaunch(
        ext.CudaImage(b"\x00" * 16),
        "k",
        [[64], [4]],
        [mx.float32, mx.float32],
        (1, 1, 1),
        (32, 1, 1),
        0,
        b"",
        [],
        scratch_outputs=[0],
    )
    assert prepared.scratch_outputs == [0]
    plan = ext.CudaPlan(2)
    with pytest.raises(ValueError, match="has 1 outputs besides its scratch, but 2 output slots"):
        plan.launch(prepared, [0], [2, 3])
    plan.launch(prepared, [0], [2])
    # A chained launch reads the first output that is an array: the primitive's output 0.
    one = ([[4]], [mx.float32], (1, 1, 1), (32, 1, 1), 0, b"")
    image = ext.CudaImage(b"\x00" * 16)
    plan.launch(ext.PreparedLaunch(image, "combine", *one, [], [], [], True), [2], [3])
    plan.set_output(3)
    assert plan.primitives == [["k", "combine"]]
    assert plan.primitive_sources == [[[0], [~0]]]


def test_plan_hands_a_launch_its_slots(ext):
    """The launch reads slots 1 and 0 (two inputs, as the index error shows) and says
    why it cannot run here."""
    image = ext.CudaImage(b"\x00" * 16)
    args = ([[4]], [mx.float32], (1, 1, 1), (32, 1, 1), 0, b"")
    plan = ext.CudaPlan(2)
    plan.launch(ext.PreparedLaunch(image, "k", *args, [], [2]), [1, 0], [2])
    plan.set_output(2)
    with pytest.raises(ValueError, match=re.escape("unread input index 2 is not one of the 2")):
        plan(mx.arange(4.0), mx.arange(4.0))
    plan = ext.CudaPlan(2)
    plan.launch(ext.PreparedLaunch(image, "k", *args, [1]), [1, 0], [2])
    plan.set_output(2)
    if mx.default_device() == mx.gpu:
        pytest.skip("the default device is a GPU here")
    with pytest.raises(ValueError, match="needs a GPU stream"):
        plan(mx.arange(4.0), mx.arange(4.0))


def test_overlapping_launches_share_a_primitive(ext):
    """A launch that overlaps the one before it joins that one's primitive, a chain whose
    inputs are the plan slots its launches read (each once) and whose outputs are theirs."""
    image = ext.CudaImage(b"\x00" * 16)
    args = ([[4], [4]], [mx.float32, mx.float32], (1, 1, 1), (32, 1, 1), 0, b"")
    split = ext.PreparedLaunch(image, "split", *args, [])
    assert split.overlaps_previous is False
    plan = ext.CudaPlan(2)
    plan.launch(split, [0, 1], [2, 3])
    one = ([[4]], [mx.float32], (1, 1, 1), (32, 1, 1), 0, b"")
    # Reads the split's second output, argument 1 again and argument 0: three inputs, and
    # unread input 3 is not one of them.
    combine = ext.PreparedLaunch(image, "combine", *one, [], [3], [], True)
    assert combine.overlaps_previous is True
    plan.launch(combine, [3, 1, 0], [4])
    plan.launch(ext.PreparedLaunch(image, "after", *one, []), [4], [5])
    plan.launch(ext.PreparedLaunch(image, "chained", *one, [], [], [], True), [5], [6])
    assert plan.primitives == [["split", "combine"], ["after", "chained"]]
    # The combine reads the split's output 1 (~1), then the chain's inputs 1 and 0 (slots 1
    # and 0, which the split already takes: no new input).
    assert plan.primitive_sources == [[[0, 1], [~1, 1, 0]], [[0], [~0]]]
    plan.set_output(6)
    with pytest.raises(ValueError, match=re.escape("unread input index 3 is not one of the 3")):
        plan(mx.arange(4.0), mx.arange(4.0))
    # An argument that only a later launch of a chain reads is named with that launch.
    late = ext.CudaPlan(2)
    late.launch(split, [0, 0], [2, 3])
    late.launch(ext.PreparedLaunch(image, "combine", *one, [], [], [], True), [3, 1], [4])
    late.set_output(4)
    assert late.primitive_sources == [[[0, 1], [~1, 2]]]
    with pytest.raises(ValueError, match="kernel 'combine' needs slot 1, but that argument"):
        late(mx.arange(4.0), None)
    # A launch with a gradient ends its primitive: only a chain's last launch may have one.
    plan = ext.CudaPlan(2)
    plan.launch(split, [0, 1], [2, 3], [0], lambda primals, cotangents: primals)
    plan.launch(ext.PreparedLaunch(image, "combine", *one, [], [], [], True), [3], [4])
    assert plan.primitives == [["split"], ["combine"]]
    plan.set_output(4)
    if mx.default_device() == mx.gpu:
        pytest.skip("the default device is a GPU here")
    with pytest.raises(ValueError, match="needs a GPU stream"):
        plan(mx.arange(4.0), mx.arange(4.0))


def test_sdpa_vector_files_a_native_plan_and_serves_from_it(monkeypatch, ext):
    """The first call of a signature decides in Python and files the decision's plan; the next
    call is served by the table alone."""
    from aotc.families.sdpa_vector import api

    table = ext.CallTable()
    monkeypatch.setattr(api, "_native_calls", table)
    made = []

    class Runner:  # a decision whose plan is a native call, as CudaRunner's
        def plan(self, scale):
            made.append(scale)
            return _cast_plan(ext, num_args=6)  # "out" is q cast to float16

    monkeypatch.setattr(api, "_decide", lambda *args: Runner())
    q = k = v = mx.ones((1, 2, 1, 8))
    out = api.sdpa_vector(q, k, v, scale=0.5)
    assert out.dtype == mx.float16 and made == [0.5] and len(table) == 1

    def no_decision(*args):
        raise AssertionError("a filed signature decided again")

    monkeypatch.setattr(api, "_decide", no_decision)
    assert api.sdpa_vector(q * 2, k, v, scale=0.5).tolist() == (q * 2).tolist()
    with pytest.raises(AssertionError, match="decided again"):
        api.sdpa_vector(q, k, v, scale=0.25)  # another scale: another signature
    with pytest.raises(AssertionError, match="decided again"):
        api.sdpa_vector(q, k, v, scale=0.5, stream=mx.default_stream(mx.default_device()))
    import aotc

    aotc.clear_cache()  # public: forgets the decisions and empties the table
    assert len(table) == 0


def _mask(kind):
    if kind == "bool":
        return mx.random.uniform(shape=(3, 40)) > 0.3
    if kind == "additive":
        return mx.random.normal((2, 1, 3, 40)).astype(mx.float16)
    return kind


@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fallbacks_are_filed_and_served_by_mlxs_op(monkeypatch, ext, mask, with_sinks):
    """A signature that falls back is filed too: its later calls go from the table to MLX's
    own op, with what MLX's Python binding passes it (scale, mask mode, mask, sinks)."""
    from aotc.families.sdpa_vector import api

    if mx.default_device() == mx.gpu:
        pytest.skip("the default device is a GPU here: calls may be served by kernels")
    table = ext.CallTable()
    monkeypatch.setattr(api, "_native_calls", table)
    mx.random.seed(1)
    q = mx.random.normal((2, 8, 3, 64)).astype(mx.float16)
    k = mx.random.normal((2, 2, 40, 64)).astype(mx.float16)
    v = mx.random.normal((2, 2, 40, 32)).astype(mx.float16)
    mask = _mask(mask)
    sinks = mx.random.normal((8,)).astype(mx.float16) if with_sinks else None
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, sinks=sinks)
    first = api.sdpa_vector(q, k, v, scale=0.2, mask=mask, sinks=sinks)
    assert mx.array_equal(first, want).item() and len(table) == 1

    def no_decision(*args):
        raise AssertionError("a filed fallback decided again")

    monkeypatch.setattr(api, "_decide", no_decision)
    again = api.sdpa_vector(q * 2, k, v, scale=0.2, mask=mask, sinks=sinks)
    want = mx.fast.scaled_dot_product_attention(q * 2, k, v, scale=0.2, mask=mask, sinks=sinks)
    assert mx.array_equal(again, want).item()
    # MLX's gradients flow through the filed call as through the op.
    grad = mx.grad(lambda x: api.sdpa_vector(x, k, v, scale=0.2, mask=mask, sinks=sinks).sum())
    want_grad = mx.grad(
        lambda x: mx.fast.scaled_dot_product_attention(
            x, k, v, scale=0.2, mask=mask, sinks=sinks
        ).sum()
    )
    assert mx.allclose(grad(q), want_grad(q)).item()


def test_fallbacks_decide_each_call_while_debug_logs_them(monkeypatch, ext, caplog):
    import logging

    from aotc.families.sdpa_vector import api

    if mx.default_device() == mx.gpu:
        pytest.skip("the default device is a GPU here: calls may be served by kernels")
    table = ext.CallTable()
    monkeypatch.setattr(api, "_native_calls", table)
    q = k = v = mx.ones((1, 2, 1, 8))
    with caplog.at_level(logging.DEBUG, logger="aotc"):
        api.sdpa_vector(q, k, v, scale=0.5)
        api.sdpa_vector(q, k, v, scale=0.5)
    logged = [r for r in caplog.records if "falls back to MLX" in r.message]
    assert len(logged) == 2 and len(table) == 0
    # A mask string MLX does not know keeps MLX's own error, call after call.
    for _ in range(2):
        with pytest.raises(ValueError, match="mask"):
            api.sdpa_vector(q, k, v, scale=0.5, mask="sliding")
    assert len(table) == 0


def test_a_broken_extension_leaves_calls_to_python(monkeypatch):
    """The table only speeds calls up: without it every call decides in Python, and falls back
    to MLX's op here."""
    from aotc.families.sdpa_vector import api
    from aotc.runtime import cuda

    def broken():
        raise RuntimeError("nanobind: type already registered")

    monkeypatch.setattr(cuda, "extension", broken)
    assert api._call_table() is None
    monkeypatch.setattr(api, "_native_calls", None)
    q = k = v = mx.ones((1, 2, 1, 8))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5)
    if mx.default_device() == mx.gpu:
        pytest.skip("the default device is a GPU here: the decision would need the extension")
    assert mx.array_equal(api.sdpa_vector(q, k, v, scale=0.5), want).item()
