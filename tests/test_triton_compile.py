"""Every Triton kernel compiles for the H200 (sm_90) through Triton's whole pipeline, down to a
cubin from ptxas, on a machine without a GPU: the interpreter tests check what the kernels compute,
this checks that the CUDA compiler accepts them (types across branches, scalar arguments, Philox).

Compilation runs in a fresh process: the interpreter tests set ``TRITON_INTERPRET=1`` before
importing the kernels, which makes them interpreted functions for the rest of their process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

# Only looked up, not imported: Triton imported before the interpreter tests set TRITON_INTERPRET
# keeps (in Triton 3.7) compiled-mode helpers that their interpreted kernels cannot call.
if os.environ.get("CI", "").lower() != "true" and importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

H200 = ("cuda", 90, 32)  # backend, compute capability, warp size


def compile_all() -> list[str]:
    """Compile each kernel (every spline order's constants) for ``H200``; returns what compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kanfarm.models import triton_spline as ts
    from kanfarm.packing import triton_pack as tp

    target = GPUTarget(*H200)
    done = []

    def build(fn, signature: dict, constexprs: dict, label: str) -> None:
        kernel = triton.compile(ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs),
                                target=target)
        assert kernel.asm["cubin"], label
        done.append(label)

    spline = {"x_ptr": "*fp32", "t0_ptr": "*fp64", "inv_h_ptr": "*fp64", "out_ptr": "*fp32",
              "n_rows": "i32", "n_in": "i32"}
    grad = {"grad_ptr": "*fp32", **spline}
    for order in (2, 3, 4, 5):
        constants = {"N_BASES": 5 + order, **ts._constants(order)}
        build(ts._bases_kernel, spline, constants, f"bases order {order}")
        build(ts._input_grad_kernel, grad, constants, f"input grad order {order}")
    step = {"p_ptr": "*fp32", "g_ptr": "*fp32", "buf_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32",
            "kind_ptr": "*i32", "neg_lr_ptr": "*fp32", "neg_step_ptr": "*fp32", "alive_ptr": "*u8",
            "n": "i32", "first_step": "i32", "bc2_sqrt": "fp32", "momentum": "fp32", "beta1_weight": "fp32",
            "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32"}
    build(tp._member_step, step, {"BLOCK_N": tp.BLOCK}, "pack optimiser step")
    noise = {"noise_ptr": "*fp32", "key_ptr": "*i64", "keep_ptr": "*fp32", "scale_ptr": "*fp32", "n": "i32",
             "step": "i32", "layer": "i32"}
    build(tp._member_noise, noise, {"BLOCK_N": tp.BLOCK}, "pack dropout noise")
    return done


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.test_triton_compile import compile_all; print('\\n'.join(compile_all()))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = done.stdout.strip().split("\n")
    assert len(compiled) == 10 and compiled[-2:] == ["pack optimiser step", "pack dropout noise"]
