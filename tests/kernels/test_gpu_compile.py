"""The new Triton kernels compile for an H100 (sm_90) on a machine without a GPU: Triton's front end
and ptxas (shipped with Triton) run on the CPU. The interpreter the other kernel tests use runs
kernels as Python and misses what only the compiler checks: non-constexpr globals, loop-carried
values changing type, dot operands of mixed dtypes."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = ("cuda", 90, 32)  # H100 / H200


def _softmax_kernels():
    from recblr_torchrec.kernels.softmax_ce import triton as softmax

    for dtype, smoothing, precision in (("bf16", True, "tf32"), ("fp32", False, "ieee")):
        rows = {"h_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "bias_ptr": "*fp32", "target_ptr": "*i64"}
        rows.update(spread_ptr="*fp32", lse_ptr="*fp32")
        sizes = {"M": "i32", "N": "i32", "D": "i32", "stride_h": "i32", "stride_c": "i32", "smoothing": "fp32"}
        sizes.update({name: "constexpr" for name in ("SMOOTH", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_D")})
        tiles = {"SMOOTH": smoothing, "PRECISION": precision, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}
        yield softmax._forward_kernel, {**rows, "loss_ptr": "*fp32", **sizes}, tiles
        grads = {**rows, "g_ptr": "*fp32"}
        yield softmax._grad_hidden_kernel, {**grads, "dh_ptr": f"*{dtype}", **sizes}, tiles
        for dc in {dtype, "fp32"}:  # dc itself, or float32 partials of a row split
            dc_sizes = {**sizes, "rows_per_split": "i32"}
            yield softmax._grad_candidates_kernel, {**grads, "dc_ptr": f"*{dc}", **dc_sizes}, {**tiles, "BLOCK_N": 128}


def _bdlru_kernels():
    from recblr_torchrec.kernels.bdlru import triton as bdlru

    t, shape = "*bf16", {"offsets_ptr": "*i64", "T": "i32", "D": "i32"}
    flags = {"IS_PACKED": "constexpr", "CHUNK": "constexpr", "BLOCK_D": "constexpr", "STAGES": "constexpr"}
    segments = {"segment": "i32", "num_parts": "i32"}
    pair = {"decay_ptr": "*fp32", "state_ptr": "*fp32"}
    forward, backward = (
        {"IS_PACKED": True, "CHUNK": 16, "BLOCK_D": 32, "STAGES": 2},
        {"IS_PACKED": True, "CHUNK": 8, "BLOCK_D": 32, "STAGES": 2},
    )
    inputs = {"c_ptr": t, "g_ptr": t, "z_ptr": t, "rate_ptr": "*fp32"}
    yield (
        bdlru._bdlru_forward_kernel,
        {**inputs, "out_ptr": t, "h_ptr": "*fp32", **pair, **shape, "z_stride": "i32", **segments, **flags},
        forward,
    )
    summary = {"c_ptr": t, "g_ptr": t, "rate_ptr": "*fp32", **pair, **shape, **segments, **flags}
    yield bdlru._forward_summary_kernel, summary, forward
    grads = {"dc_ptr": t, "dg_ptr": t, "dz_ptr": t, "drate_ptr": "*fp32", "decay_ptr": "*fp32", "delta_ptr": "*fp32"}
    yield (
        bdlru._bdlru_backward_kernel,
        {**inputs, "h_ptr": "*fp32", "dout_ptr": t, **grads, **shape, "z_stride": "i32", **segments, **flags},
        backward,
    )
    summary = {"g_ptr": t, "z_ptr": t, "rate_ptr": "*fp32", "dout_ptr": t, "decay_ptr": "*fp32", "delta_ptr": "*fp32"}
    yield bdlru._backward_summary_kernel, {**summary, **shape, "z_stride": "i32", **segments, **flags}, backward


def _conv_kernels():
    from recblr_torchrec.kernels.causal_conv import triton as conv

    pointers = {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "pos_ptr": "*i64", "dc_ptr": "*bf16"}
    outputs = {"dpre_ptr": "*bf16", "dw_ptr": "*fp32", "db_ptr": "*fp32"}
    sizes = {"N": "i32", "D": "i32", "x_stride": "i32"}
    flags = {name: "constexpr" for name in ("K", "K_POW2", "BLOCK_N", "BLOCK_D")}
    for taps in (1, 4, 6):  # fewer taps than the registers hold, as many, more
        tiles = {"K": taps, "K_POW2": 1 << (taps - 1).bit_length(), "BLOCK_N": 16, "BLOCK_D": 128}
        yield conv._conv_silu_dpre_kernel, {**pointers, **outputs, **sizes, **flags}, tiles
    small = {"K": 4, "BLOCK_N": 64, "BLOCK_D": 64}
    small_flags = {name: "constexpr" for name in small}
    forward = {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": "*bf16"}
    yield conv._conv_silu_forward_kernel, {**forward, **sizes, **small_flags}, small
    dx = {"dpre_ptr": "*bf16", "w_ptr": "*fp32", "pos_ptr": "*i64", "dx_ptr": "*bf16", "N": "i32", "D": "i32"}
    yield conv._conv_dx_kernel, {**dx, **small_flags}, small


KERNELS = (_softmax_kernels, _bdlru_kernels, _conv_kernels)


def compile_all() -> None:
    """Compiles every kernel above to a cubin; run in a process without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernels in KERNELS:
        for kernel, signature, constants in kernels():
            source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
            compiled = triton.compile(source, target=GPUTarget(*TARGET), options={"num_warps": 4})
            assert compiled.asm["cubin"], kernel.__name__
            print("compiled", kernel.__name__)


def test_the_softmax_bdlru_and_conv_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import tests.kernels.test_gpu_compile as t; t.compile_all()"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("compiled") == sum(1 for kernels in KERNELS for _ in kernels())
