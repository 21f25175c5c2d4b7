"""The Metal launch plan of `sdpa_vector` against values read off MLX's own host code.

References are to `mlx/backend/metal/scaled_dot_product_attention.cpp` at ml-explore/mlx 846d176
(0.32.2-dev; the routing, block heuristic and bindings are the same in the later 00703ea) and to
`mlx/backend/metal/kernels/sdpa_vector.h` of the installed MLX 0.32.4. Nothing here runs Metal.
"""

from __future__ import annotations

import re
import typing
from dataclasses import replace
from pathlib import Path

import pytest

from aotc.families.sdpa_vector import metal
from aotc.families.sdpa_vector.metal import (
    ArrayBuffer,
    ArrayRef,
    ArraySpec,
    BytesBuffer,
    Const,
    InputSpec,
    NotRowContiguous,
    Param,
    StrideOf,
    plan_attention,
)
from aotc.families.sdpa_vector.problem import AttentionProblem, Unsupported

REPO = Path(__file__).resolve().parents[1]


def problem(
    *,
    batch=1,
    q_heads=32,
    kv_heads=8,
    q_len=1,
    kv_len=512,
    d=128,
    v=128,
    dtype="float16",
    mask="none",
    sinks=False,
) -> AttentionProblem:
    mask_shape = (batch, q_heads, q_len, kv_len) if mask in ("bool", "additive") else None
    return AttentionProblem(
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        qk_dim=d,
        v_dim=v,
        dtype=dtype,
        mask=mask,
        mask_shape=mask_shape,
        has_sinks=sinks,
    )


# --------------------------------------------------------------------------------------------
# Routing and blocks: one row per branch of eval_gpu (lines 874-879) and sdpa_vector_2pass
# (lines 485-523). n_simds = gqa_factor * q_len (line 483).
# --------------------------------------------------------------------------------------------

# (architecture, kv_heads, q_heads, q_len, kv_len, variant, blocks)
ROUTES = [
    # line 875: (devc == 'd' || devc == 's') && k.shape(2) >= 1024
    ("applegpu_g15s", 8, 8, 1, 1023, "one_pass", None),
    ("applegpu_g15s", 8, 8, 1, 1024, "split_pass", 64),  # 489: blocks = 64 (N > 1024 is false)
    ("applegpu_g14d", 8, 8, 1, 1024, "split_pass", 128),  # 502: blocks = 128
    # line 876: k.shape(1) < q.shape(1) && k.shape(2) >= 4096, on any GPU
    ("applegpu_g15g", 8, 32, 1, 4095, "one_pass", None),
    ("applegpu_g15g", 8, 32, 1, 4096, "split_pass", 64),  # 513-514: n_simds 4 >= 4 -> 64
    ("applegpu_g13g", 8, 16, 1, 8192, "split_pass", 32),  # 515-516: n_simds 2 < 4 -> 32
    ("applegpu_g16p", 2, 8, 1, 4096, "split_pass", 64),  # 'p' (phone) takes the else branch
    ("applegpu_g15g", 8, 8, 1, 100_000, "one_pass", None),  # no GQA, not Max/Ultra: one pass
    # 's' (Max), lines 488-500: more blocks only when N > 1024 && n_simds > 4
    ("applegpu_g16s", 8, 32, 1, 8192, "split_pass", 64),  # n_simds 4 is not > 4
    ("applegpu_g16s", 8, 64, 1, 1024, "split_pass", 64),  # N 1024 is not > 1024
    ("applegpu_g16s", 8, 64, 1, 1025, "split_pass", 128),  # 491-492: N <= 8192
    ("applegpu_g16s", 8, 64, 1, 8192, "split_pass", 128),
    ("applegpu_g16s", 8, 64, 1, 8193, "split_pass", 256),  # 493-494: N <= 32768
    ("applegpu_g16s", 8, 64, 1, 32768, "split_pass", 256),
    ("applegpu_g16s", 8, 64, 1, 32769, "split_pass", 512),  # 495-496: N <= 65536
    ("applegpu_g16s", 8, 64, 1, 65536, "split_pass", 512),
    ("applegpu_g16s", 8, 64, 1, 65537, "split_pass", 1024),  # 497-498
    ("applegpu_g16s", 4, 4, 5, 2048, "split_pass", 128),  # n_simds = 1 * 5 query rows > 4
    # 'd' (Ultra), lines 501-512
    ("applegpu_g14d", 8, 16, 1, 8192, "split_pass", 128),  # n_simds 2, N 8192 is not > 8192
    ("applegpu_g14d", 8, 16, 1, 8193, "split_pass", 256),  # 503-504: n_simds <= 2 && N > 8192
    ("applegpu_g14d", 8, 8, 2, 9000, "split_pass", 256),  # n_simds = 1 * 2 query rows
    ("applegpu_g14d", 8, 32, 1, 100_000, "split_pass", 128),  # n_simds 4 or 5: stays 128
    ("applegpu_g14d", 8, 48, 1, 16383, "split_pass", 128),  # n_simds 6, N < 16384
    ("applegpu_g14d", 8, 48, 1, 16384, "split_pass", 512),  # 505-507: 16384 <= N < 65536
    ("applegpu_g14d", 8, 48, 1, 65535, "split_pass", 512),
    ("applegpu_g14d", 8, 48, 1, 65536, "split_pass", 1024),  # 508-509: N >= 65536
]


@pytest.mark.parametrize(
    ("arch", "kv_heads", "q_heads", "q_len", "kv_len", "variant", "blocks"), ROUTES
)
def test_route_and_blocks(arch, kv_heads, q_heads, q_len, kv_len, variant, blocks):
    p = plan_attention(
        problem(q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len), arch
    )
    assert (p.variant, p.blocks) == (variant, blocks)
    if blocks is not None:
        assert p.dispatches[0].constant(26).value == Const(blocks)
        assert p.dispatches[1].buffer(4).value == Const(blocks)
        assert p.dispatches[0].grid[2] == blocks


def test_blocks_override_rounds_up_to_simd_width():
    # lines 518-523: MLX_SDPA_BLOCKS rounded up to a multiple of 32
    assert metal.split_blocks("applegpu_g15s", 4096, 8, override=33) == 64
    assert metal.split_blocks("applegpu_g15s", 4096, 8, override=96) == 96
    assert metal.split_blocks("applegpu_g15s", 4096, 8, override=1) == 32
    p = plan_attention(problem(kv_len=4096), "applegpu_g15s", blocks_override=100)
    assert p.blocks == 128
    assert p.temporaries[0].shape == (1, 32, 1, 128, 128)


@pytest.mark.parametrize(
    ("name", "generation", "size"),
    [
        ("applegpu_g15s", 15, "s"),
        ("applegpu_g13g", 13, "g"),
        ("applegpu_g14d", 14, "d"),
        ("applegpu_g16p", 16, "p"),
        ("", 0, ""),  # device.cpp: arch_gen_ stays 0 when the digits are not there
    ],
)
def test_architecture(name, generation, size):
    arch = metal.Architecture(name)
    assert (arch.generation, arch.size) == (generation, size)


# --------------------------------------------------------------------------------------------
# The one-pass launch: sdpa_vector (lines 364-452) and the kernel's buffers (sdpa_vector.h 16-41)
# --------------------------------------------------------------------------------------------

KV_STRIDES_ONE_PASS = {
    # lines 388-391: `k.shape(1) == 1 ? k.strides(0) : k.strides(1)`, `k.strides()[2]`, size_t
    6: ("uint64", StrideOf(1, (1, 0), "last")),
    7: ("uint64", StrideOf(1, (2,), "last")),
    8: ("uint64", StrideOf(2, (1, 0), "last")),
    9: ("uint64", StrideOf(2, (2,), "last")),
}


def test_one_pass_plain():
    p = plan_attention(problem(batch=2, q_heads=32, kv_heads=8, kv_len=512), "applegpu_g15g")
    assert p.variant == "one_pass" and p.blocks is None and p.temporaries == ()
    (d,) = p.dispatches
    assert d.kernel == "sdpa_vector_float16_t_128_128"  # lines 378-383
    assert d.grid == (2 * 32, 1, 1)  # line 394: (B * H, L, 1)
    assert d.threadgroup == (1024, 1, 1)  # line 393
    assert {c.index: c.value for c in d.constants} == {
        20: Const(False),  # has_mask
        21: NotRowContiguous(0),  # query_transposed = !q.flags().row_contiguous (line 399)
        22: Const(False),  # do_causal
        23: Const(False),  # bool_mask
        24: Const(False),  # float_mask
        25: Const(False),  # has_sinks
    }
    assert all(c.type == "bool" for c in d.constants)  # lines 402-407: DataTypeBool
    buffers = {b.index: b for b in d.buffers}
    assert sorted(buffers) == list(range(11))
    assert buffers[0].array == ArrayRef("input", 0)  # lines 422-425
    assert buffers[1].array == ArrayRef("input", 1)
    assert buffers[2].array == ArrayRef("input", 2)
    assert buffers[3] == ArrayBuffer(3, ArrayRef("output", 0), "write", "out")
    assert (buffers[4].type, buffers[4].value) == ("int32", Const(4))  # gqa_factor (line 426)
    assert (buffers[5].type, buffers[5].value) == ("int32", Const(512))  # N (line 427)
    for index, (ctype, value) in KV_STRIDES_ONE_PASS.items():
        assert (buffers[index].type, buffers[index].value) == (ctype, value)
    assert (buffers[10].type, buffers[10].value) == ("float32", Param("scale"))  # line 433
    assert p.outputs == (ArraySpec("out", (2, 32, 1, 128), "float16"),)
    assert p.inputs == (
        InputSpec("queries", "row_contiguous_or_seq_major"),  # q_copy_unless (lines 814-828)
        InputSpec("keys", "inner_contiguous_flat_batch_heads"),  # kv_copy_unless (830-843)
        InputSpec("values", "inner_contiguous_flat_batch_heads"),
    )


@pytest.mark.parametrize(
    ("mask", "index", "name", "fc"),
    [
        # line 436: set_input_array(m, 11 + float_mask); sdpa_vector.h: bmask 11, fmask 12
        ("bool", 11, "bmask", {20: True, 23: True, 24: False}),
        ("additive", 12, "fmask", {20: True, 23: False, 24: True}),
    ],
)
def test_one_pass_array_mask(mask, index, name, fc):
    p = plan_attention(problem(mask=mask, q_len=3), "applegpu_g15g")
    (d,) = p.dispatches
    assert d.buffer(index) == ArrayBuffer(index, ArrayRef("input", 3), "read", name)
    assert 11 + 12 - index not in {b.index for b in d.buffers}
    for fc_index, value in fc.items():
        assert d.constant(fc_index).value == Const(value)
    assert d.constant(22).value == Const(False)  # an array mask is not causal
    # lines 437-443: int32 strides, 0 along broadcast (size-1) axes
    assert d.buffer(13) == BytesBuffer(13, "int32", StrideOf(3, (3,), "zero"), "mask_kv_seq_stride")
    assert d.buffer(14) == BytesBuffer(14, "int32", StrideOf(3, (2,), "zero"), "mask_q_seq_stride")
    assert d.buffer(15) == BytesBuffer(15, "int32", StrideOf(3, (1, 0), "zero"), "mask_head_stride")
    assert p.inputs[3] == InputSpec("mask", "flat_batch_heads")  # mask_copy_unless (853-858)


@pytest.mark.parametrize(("q_len", "causal"), [(1, False), (4, True)])
def test_causal(q_len, causal):
    # line 873: do_causal = do_causal_ && q.shape(2) > 1; has_mask is for array masks only
    for arch, kv_len in (("applegpu_g15g", 512), ("applegpu_g15s", 4096)):
        p = plan_attention(problem(mask="causal", q_len=q_len, kv_len=kv_len), arch)
        first = p.dispatches[0]
        assert first.constant(22).value == Const(causal)
        assert first.constant(20).value == Const(False)
        assert len(p.inputs) == 3
        assert not any(isinstance(b, ArrayBuffer) and b.array.index == 3 for b in first.buffers)


def test_one_pass_sinks_with_mask():
    p = plan_attention(problem(mask="bool", sinks=True, q_heads=16), "applegpu_g15g")
    (d,) = p.dispatches
    # lines 445-448: sinks at 16 and q.shape(1) at 17; sinks come after the mask (inputs.back())
    assert d.buffer(16) == ArrayBuffer(16, ArrayRef("input", 4), "read", "sinks")
    assert d.buffer(17) == BytesBuffer(17, "int32", Const(16), "num_q_heads")
    assert d.constant(25).value == Const(True)
    assert p.inputs[4] == InputSpec("sinks", "inner_contiguous")  # is_matrix_contiguous (806)


def test_one_pass_sinks_without_mask():
    p = plan_attention(problem(sinks=True), "applegpu_g15g")
    assert p.dispatches[0].buffer(16).array == ArrayRef("input", 3)
    assert [i.name for i in p.inputs] == ["queries", "keys", "values", "sinks"]


# --------------------------------------------------------------------------------------------
# The split pass: sdpa_vector_2pass (lines 454-631), kernel buffers (sdpa_vector.h 180-203, 580+)
# --------------------------------------------------------------------------------------------


def test_split_pass_gqa_transposed_queries():
    p = plan_attention(
        problem(batch=2, q_heads=32, kv_heads=4, q_len=2, kv_len=20000, dtype="bfloat16"),
        "applegpu_g15s",
    )
    assert p.variant == "split_pass" and p.blocks == 256  # 's', N <= 32768, n_simds 16
    first, combine = p.dispatches
    assert first.kernel == "sdpa_vector_2pass_1_bfloat16_t_128_128"  # lines 468-477, no _gqa
    assert combine.kernel == "sdpa_vector_2pass_2_bfloat16_t_128"  # lines 610-613
    assert first.threadgroup == (32, 8, 2)  # line 528: (32, gqa_factor, q.shape(2))
    assert first.grid == (4, 2, 256)  # line 529: (k.shape(1), q.shape(0), blocks)
    assert combine.threadgroup == (1024, 1, 1)  # line 627
    assert combine.grid == (2 * 32, 2, 1)  # line 628: (B * H, L, 1)
    # lines 532-541: intermediate in q's dtype, sums and maxs in float32
    assert p.temporaries == (
        ArraySpec("partials", (2, 32, 2, 256, 128), "bfloat16"),
        ArraySpec("sums", (2, 32, 2, 256), "float32"),
        ArraySpec("maxs", (2, 32, 2, 256), "float32"),
    )
    assert first.constant(26) == metal.FunctionConstant(26, "int32", Const(256), "blocks")
    assert first.constant(21).value == NotRowContiguous(0)
    buffers = {b.index: b for b in first.buffers}
    assert sorted(buffers) == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]  # buffer(6) is unused
    assert [buffers[i].array for i in (3, 4, 5)] == [  # lines 581-583: written
        ArrayRef("temporary", 0),
        ArrayRef("temporary", 1),
        ArrayRef("temporary", 2),
    ]
    assert all(buffers[i].access == "write" for i in (3, 4, 5))
    assert buffers[7].value == Const(20000)  # N
    assert [(buffers[i].type, buffers[i].value) for i in (8, 9, 10, 11)] == list(
        KV_STRIDES_ONE_PASS.values()
    )
    assert buffers[12].value == Param("scale")
    # The combine pass reads them back (lines 620-624) and writes the output.
    assert [(b.index, b.array, b.access) for b in combine.buffers[:4]] == [
        (0, ArrayRef("temporary", 0), "read"),
        (1, ArrayRef("temporary", 1), "read"),
        (2, ArrayRef("temporary", 2), "read"),
        (3, ArrayRef("output", 0), "write"),
    ]
    assert combine.buffers[4] == BytesBuffer(4, "int32", Const(256), "blocks")
    assert combine.constants == ()  # line 616: d.get_kernel(kname) without constants
    # sdpa_vector_2pass_1 offsets transposed queries by num_q_heads * q_seq_idx: B must be 1.
    assert p.inputs[0] == InputSpec("queries", "row_contiguous_or_seq_major_one_batch")


@pytest.mark.parametrize(("mask", "index"), [("bool", 13), ("additive", 14)])
def test_split_pass_mask_and_sinks(mask, index):
    p = plan_attention(problem(mask=mask, sinks=True, kv_len=2048), "applegpu_g14d")
    first = p.dispatches[0]
    assert first.buffer(index).array == ArrayRef("input", 3)  # line 592: 13 + float_mask
    assert [first.buffer(i).value for i in (15, 16, 17)] == [  # lines 593-599
        StrideOf(3, (3,), "zero"),
        StrideOf(3, (2,), "zero"),
        StrideOf(3, (1, 0), "zero"),
    ]
    assert first.buffer(18).array == ArrayRef("input", 4)  # line 602: sinks at 18
    assert first.constant(25).value == Const(True)


def test_head_dims_and_dtypes_name_the_kernels():
    p = plan_attention(problem(d=576, v=512, dtype="float32", kv_len=8192), "applegpu_g15s")
    assert p.kernel_names == (
        "sdpa_vector_2pass_1_float_576_512",
        "sdpa_vector_2pass_2_float_512",
    )
    p = plan_attention(problem(d=192, v=128, dtype="bfloat16"), "applegpu_g15g")
    assert p.kernel_names == ("sdpa_vector_bfloat16_t_192_128",)


# --------------------------------------------------------------------------------------------
# Launch limits: the pipeline's maxTotalThreadsPerThreadgroup (MLX PR 4349 saw 832 at D = 512)
# --------------------------------------------------------------------------------------------

D512 = problem(q_heads=32, kv_heads=4, d=512, v=512, dtype="bfloat16", kv_len=512)
ONE_512 = "sdpa_vector_bfloat16_t_512_512"
SPLIT_512 = "sdpa_vector_2pass_1_bfloat16_t_512_512"
COMBINE_512 = "sdpa_vector_2pass_2_bfloat16_t_512"


def test_limits_unknown_or_fitting_keep_mlx_route():
    assert plan_attention(D512, "applegpu_g13s").variant == "one_pass"
    fits = {ONE_512: 1024, SPLIT_512: 1024, COMBINE_512: 1024}
    assert plan_attention(D512, "applegpu_g13s", pipeline_max_threads=fits).variant == "one_pass"


def test_one_pass_over_limit_takes_the_split_pass():
    limits = {ONE_512: 832, SPLIT_512: 832, COMBINE_512: 1024}
    p = plan_attention(D512, "applegpu_g13s", pipeline_max_threads=limits)
    assert p.variant == "split_pass"
    assert p.dispatches[0].threads_per_threadgroup == 32 * 8  # fits 832
    assert p.blocks == 64  # 's', N 512 is not > 1024
    assert "1024 threads per threadgroup but its pipeline allows 832" in p.reason


def test_neither_variant_fits_falls_back_with_the_reason():
    limits = {ONE_512: 832, SPLIT_512: 832, COMBINE_512: 832}
    with pytest.raises(Unsupported) as error:
        plan_attention(D512, "applegpu_g13s", pipeline_max_threads=limits)
    assert str(error.value) == (
        "one_pass does not fit: sdpa_vector_bfloat16_t_512_512 launches 1024 threads per "
        "threadgroup but its pipeline allows 832; split_pass does not fit: "
        "sdpa_vector_2pass_2_bfloat16_t_512 launches 1024 threads per threadgroup but its "
        "pipeline allows 832"
    )


def test_split_pass_over_limit_takes_the_one_pass():
    long = replace(D512, kv_len=8192)
    limits = {ONE_512: 1024, SPLIT_512: 128, COMBINE_512: 1024}
    p = plan_attention(long, "applegpu_g13s", pipeline_max_threads=limits)
    assert p.variant == "one_pass"
    assert p.reason.startswith("split_pass does not fit: sdpa_vector_2pass_1_bfloat16_t_512_512")


def test_probe_asks_for_every_pipeline_with_graph_time_constants():
    calls = []

    def probe(path, kernel, constants):
        calls.append((path, kernel, constants))
        return 832 if kernel == ONE_512 else 1024

    limits = metal.probe_pipeline_limits(D512, "applegpu_g13s", "x.metallib", probe=probe)
    assert limits == {ONE_512: 832, SPLIT_512: 1024, COMBINE_512: 1024}
    by_kernel = {kernel: constants for _, kernel, constants in calls}
    assert by_kernel[ONE_512][1] == {"index": 21, "type": "bool", "value": False}
    assert by_kernel[SPLIT_512][-1] == {"index": 26, "type": "int32", "value": 64}
    assert by_kernel[COMBINE_512] == []
    assert plan_attention(D512, "applegpu_g13s", pipeline_max_threads=limits).variant == (
        "split_pass"
    )


# --------------------------------------------------------------------------------------------
# Cases MLX has no vector kernel for (has_fused_kernel, lines 686-709; eval_gpu line 812)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"q_len": 9, "kv_len": 64}, "9 query rows"),
        ({"q_len": 4, "kv_len": 3}, "exceeds the key length"),
        ({"q_len": 8, "q_heads": 64, "kv_heads": 8}, "times GQA factor 8 exceeds 32"),
        ({"d": 80, "v": 80}, "head dim 80"),
        ({"d": 128, "v": 1056}, "value head dim 1056"),
    ],
)
def test_unsupported(kwargs, message):
    with pytest.raises(Unsupported, match=message):
        plan_attention(problem(**kwargs), "applegpu_g15s")


# --------------------------------------------------------------------------------------------
# The wire format that src/metal/metal_bindings.cpp parses
# --------------------------------------------------------------------------------------------


def test_wire_of_a_split_pass_with_additive_mask():
    p = plan_attention(problem(mask="additive", kv_len=1024, q_heads=8), "applegpu_g15s")
    wire = p.wire({"scale": 0.125})
    assert wire["version"] == 1
    assert wire["inputs"][3] == {"name": "mask", "layout": "flat_batch_heads"}
    assert wire["outputs"] == [{"name": "out", "shape": [1, 8, 1, 128], "dtype": "float16"}]
    assert wire["temporaries"][1] == {"name": "sums", "shape": [1, 8, 1, 64], "dtype": "float32"}
    first, combine = wire["dispatches"]
    assert first["grid"] == [8, 1, 64] and first["threadgroup"] == [32, 1, 1]
    buffers = {b["index"]: b for b in first["buffers"]}
    assert buffers[12] == {"index": 12, "type": "float32", "value": 0.125}
    assert buffers[14] == {"index": 14, "array": ["input", 3], "access": "read"}
    assert buffers[17] == {
        "index": 17,
        "type": "int32",
        "value": {"stride_of": 3, "axes": [1, 0], "singleton": "zero"},
    }
    assert first["constants"][1] == {
        "index": 21,
        "type": "bool",
        "value": {"not_row_contiguous": 0},
    }
    assert combine["constants"] == []
    with pytest.raises(ValueError, match="scale"):
        p.wire()


def _cpp_strings(path: Path, start: str, end: str) -> set[str]:
    text = path.read_text()
    block = text[text.index(start) : text.index(end, text.index(start))]
    return set(re.findall(r'\{"([a-z0-9_]+)",', block))


def test_wire_vocabulary_matches_the_cpp_parser():
    bindings = REPO / "src" / "metal" / "metal_bindings.cpp"
    layouts = _cpp_strings(bindings, "am::Layout layout(", "auto name = text")
    assert layouts == set(typing.get_args(metal.Layout))
    text = bindings.read_text()
    for scalar in typing.get_args(metal.ScalarType):
        assert f'name == "{scalar}"' in text
    assert f"constexpr int kWireVersion = {metal.WIRE_VERSION};" in text
    for key in ("stride_of", "axes", "singleton", "not_row_contiguous", "access", "threadgroup"):
        assert f'"{key}"' in text


# --------------------------------------------------------------------------------------------
# Running it: never breaks on Linux
# --------------------------------------------------------------------------------------------


def test_run_metal_without_the_metal_extension_is_unsupported():
    p = plan_attention(problem(), "applegpu_g15g")
    with pytest.raises(ValueError, match="takes 3 inputs"):
        metal.run_metal(p, [object()], "x.metallib", params={"scale": 1.0})
    try:
        from aotc import _ext  # type: ignore[attr-defined]
    except ImportError:
        _ext = None
    if _ext is not None and hasattr(_ext, "metal_launch"):
        pytest.skip("this aotc._ext has the Metal primitive")
    with pytest.raises(Unsupported):
        metal.run_metal(p, [object()] * 3, "x.metallib", params={"scale": 1.0})
    with pytest.raises(Unsupported):
        metal.make_runner(problem())


def test_prepare_inputs_builds_what_mlx_passes_its_primitive():
    mx = pytest.importorskip("mlx.core")
    q = mx.zeros((2, 4, 3, 64), dtype=mx.float16)
    k = v = mx.zeros((2, 2, 10, 64), dtype=mx.float16)
    additive = mx.zeros((3, 10), dtype=mx.float32)
    p = problem(batch=2, q_heads=4, kv_heads=2, q_len=3, kv_len=10, d=64, v=64, mask="additive")
    p = replace(p, has_sinks=True)
    sinks = mx.zeros((4,), dtype=mx.float32)
    arrays = metal.prepare_inputs(p, q, k, v, additive, sinks)
    # fast.cpp: the mask cast to the output type and broadcast to (B, H, L, N); sinks cast
    assert arrays[3].shape == (2, 4, 3, 10) and arrays[3].dtype == mx.float16
    assert arrays[4].dtype == mx.float16
    boolean = mx.ones((1, 1, 3, 10), dtype=mx.bool_)
    arrays = metal.prepare_inputs(replace(p, mask="bool", has_sinks=False), q, k, v, boolean)
    assert len(arrays) == 4 and arrays[3].dtype == mx.bool_ and arrays[3].shape == (2, 4, 3, 10)


# --------------------------------------------------------------------------------------------
# On a Mac with a Metal GPU, an aotc._ext built with AOTC_WITH_METAL and a built metallib
# (`aotc build manifest.yaml --target metal`): the plans run and match MLX. Skipped elsewhere.
# --------------------------------------------------------------------------------------------

_PROBE = """
import mlx.core as mx
assert mx.metal.is_available(), "MLX reports no Metal device"
x = mx.arange(8, dtype=mx.float32, stream=mx.gpu) * 2
assert mx.sum(x, stream=mx.gpu).item() == 56, "the Metal device computed a wrong sum"
"""


def _unavailable(reason: str):
    """Skip, or fail where the GPU tests must run (AOTC_REQUIRE_METAL_GPU=1: self-hosted CI)."""
    import os

    if os.environ.get("AOTC_REQUIRE_METAL_GPU") == "1":
        pytest.fail(f"AOTC_REQUIRE_METAL_GPU is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def metal_gpu() -> tuple[object, str]:
    """(mlx.core, metallib path), or a skip that says what is missing."""
    import os
    import subprocess
    import sys

    if sys.platform != "darwin":
        _unavailable("Metal runs only on macOS")
    # In a child process: a paravirtual GPU (GitHub's hosted runners) may crash or compute zeros.
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        _unavailable(f"no usable Metal GPU: {last}")
    try:
        metal.metal_binding()
    except Unsupported as exc:
        _unavailable(str(exc))
    path = Path(os.environ.get("AOTC_TEST_METALLIB", REPO / "dist" / "extra_sdpa.metallib"))
    if not path.is_file():
        _unavailable(f"{path} is missing: run `aotc build manifest.yaml --target metal` first")
    import mlx.core as mx

    return mx, str(path.resolve())


# (label, forced architecture, problem kwargs, query layout, kv layout); head dims of manifest.yaml
GPU_CASES = [
    ("one_pass", "applegpu_g15g", {"kv_len": 100, "d": 256, "v": 128}, "rows", "rows"),
    ("split", "applegpu_g15s", {"kv_len": 2048, "d": 256, "v": 128}, "rows", "rows"),
    ("bool_mask", "applegpu_g15g", {"q_len": 3, "kv_len": 77, "d": 192, "v": 128, "mask": "bool"},
     "rows", "rows"),
    ("additive_split", "applegpu_g14d",
     {"q_len": 2, "kv_len": 1500, "d": 192, "v": 128, "mask": "additive"}, "rows", "rows"),
    ("causal", "applegpu_g15s", {"q_len": 4, "kv_len": 1030, "d": 256, "v": 128,
                                 "mask": "causal"}, "rows", "rows"),
    ("sinks", "applegpu_g15g", {"kv_len": 300, "d": 256, "v": 128, "sinks": True}, "rows", "rows"),
    ("seq_major_cache", "applegpu_g15g", {"q_len": 3, "kv_len": 200, "d": 256, "v": 128},
     "seq_major", "cache_slice"),
    ("seq_major_split", "applegpu_g15s", {"q_len": 2, "kv_len": 1100, "d": 256, "v": 128},
     "seq_major", "cache_slice"),
    ("mla_bf16", "applegpu_g15s", {"q_heads": 16, "kv_heads": 1, "kv_len": 4096, "d": 576,
                                   "v": 512, "dtype": "bfloat16"}, "rows", "rows"),
    ("float32", "applegpu_g15g", {"kv_len": 64, "d": 192, "v": 128, "dtype": "float32"},
     "rows", "rows"),
]  # fmt: skip
TOLERANCE = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


@pytest.mark.metal
@pytest.mark.parametrize(("label", "arch", "kwargs", "q_layout", "kv_layout"), GPU_CASES,
                         ids=[c[0] for c in GPU_CASES])  # fmt: skip
def test_plan_runs_on_the_gpu_and_matches_mlx(metal_gpu, label, arch, kwargs, q_layout, kv_layout):
    mx, path = metal_gpu
    p = problem(batch=1, **kwargs)
    dtype = getattr(mx, p.dtype)
    mx.random.seed(7)
    b, h, hk, lq, n = p.batch, p.q_heads, p.kv_heads, p.q_len, p.kv_len
    if q_layout == "seq_major":  # (B, L, H, D) viewed as (B, H, L, D), as mlx-lm builds them
        q = mx.random.normal((b, lq, h, p.qk_dim)).astype(dtype).transpose(0, 2, 1, 3)
    else:
        q = mx.random.normal((b, h, lq, p.qk_dim)).astype(dtype)
    if kv_layout == "cache_slice":  # a KV cache with room for more rows
        k = mx.random.normal((b, hk, n + 64, p.qk_dim)).astype(dtype)[:, :, :n, :]
        v = mx.random.normal((b, hk, n + 64, p.v_dim)).astype(dtype)[:, :, :n, :]
    else:
        k = mx.random.normal((b, hk, n, p.qk_dim)).astype(dtype)
        v = mx.random.normal((b, hk, n, p.v_dim)).astype(dtype)
    mask = None
    if p.mask == "bool":
        mask = mx.random.uniform(shape=(lq, n)) > 0.3
    elif p.mask == "additive":
        mask = mx.random.normal((1, h, lq, n))
    elif p.mask == "causal":
        mask = "causal"
    sinks = mx.random.normal((h,)) if p.has_sinks else None
    scale = p.qk_dim**-0.5

    limits = metal.probe_pipeline_limits(p, arch, path)
    try:
        chosen = plan_attention(p, arch, pipeline_max_threads=limits)
    except Unsupported as exc:
        pytest.skip(f"this GPU's pipelines fit neither variant: {exc}")
    arrays = metal.prepare_inputs(p, q, k, v, mask, sinks)
    out = metal.run_metal(chosen, arrays, path, params={"scale": scale})[0]

    def f32(x):
        return None if x is None or isinstance(x, str) else x.astype(mx.float32)

    expected = mx.fast.scaled_dot_product_attention(
        f32(q), f32(k), f32(v), scale=scale,
        mask=mask if isinstance(mask, str) or mask is None or mask.dtype == mx.bool_ else f32(mask),
        sinks=f32(sinks), stream=mx.cpu,
    )  # fmt: skip
    assert out.shape == expected.shape and out.dtype == dtype
    error = mx.max(mx.abs(out.astype(mx.float32) - expected)).item()
    assert error <= TOLERANCE[p.dtype] * max(1.0, mx.max(mx.abs(expected)).item()), (
        f"{label} ({chosen.variant}, blocks {chosen.blocks}): max error {error}"
    )


@pytest.mark.metal
def test_runner_on_the_device_architecture(metal_gpu):
    mx, path = metal_gpu
    p = problem(batch=2, q_heads=8, kv_heads=2, q_len=1, kv_len=5000, d=256, v=128)
    run = metal.make_runner(p, library_path=path)
    assert run.plan.architecture == metal.device_architecture()
    q = mx.random.normal((2, 8, 1, 256)).astype(mx.float16)
    k = mx.random.normal((2, 2, 5000, 256)).astype(mx.float16)
    v = mx.random.normal((2, 2, 5000, 128)).astype(mx.float16)
    out = run(q, k, v, 0.0625)
    expected = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale=0.0625,
        stream=mx.cpu,
    )  # fmt: skip
    assert mx.allclose(out.astype(mx.float32), expected, atol=3e-3).item()


def test_find_library_asks_the_registry_and_checks_the_artifact(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from aotc.runtime import libraries as registry

    asked = []
    metallib = tmp_path / "extra_sdpa.metallib"

    def artifact_bytes():
        return b"bytes"

    found = SimpleNamespace(
        index=SimpleNamespace(artifact_path=metallib), artifact_bytes=artifact_bytes
    )

    def find(target, names):
        asked.append((target, list(names)))
        return found

    monkeypatch.setattr(registry, "find", find)
    names = plan_attention(problem(), "applegpu_g15s").kernel_names
    assert metal.find_library(names) == str(metallib)
    assert asked == [("metal", sorted(names))]

    def corrupt():
        raise registry.CorruptArtifact("extra_sdpa.metallib: sha256 mismatch")

    found.artifact_bytes = corrupt
    with pytest.raises(Unsupported, match="sha256 mismatch"):
        metal.find_library(names)
    monkeypatch.setattr(registry, "find", lambda target, names: None)
    with pytest.raises(Unsupported, match="no usable Metal library has"):
        metal.find_library(names)
