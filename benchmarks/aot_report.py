"""Ahead-of-time report of the Triton kernels for sm_90 (H100/H200), on any machine: no GPU needed.

Each kernel of fastdino.kernels is compiled with `triton.compile(..., target=GPUTarget("cuda", 90, 32))` for the
constexprs a K=65536 bf16 run launches with (pointers and row strides marked 16-divisible, as Triton specialises them
at launch), then `cuobjdump --dump-resource-usage` from the Triton wheel reads registers and spills from the cubin,
and the PTX gives the global loads/stores and how many of them are 128-bit (`.v4` of 32-bit words).

    python benchmarks/aot_report.py                 # the table
    python benchmarks/aot_report.py --check         # also fail unless every kernel compiles without spills and
                                                    # the EMA's full blocks use 128-bit accesses (tests run this)
Run it without TRITON_INTERPRET (the kernels must be real JIT functions).
"""
import argparse
import importlib
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

F32 = "fp32"


def _ptrs(names, kind):
    return {n: kind for n in names}


def kernel_specs():
    """(label, kernel, signature, constexprs, num_warps) for every kernel and the variants a run uses."""
    dl = importlib.import_module("fastdino.kernels.dino_loss")
    ema = importlib.import_module("fastdino.kernels.ema")
    teacher = {"t_ptr": "*bf16", **_ptrs(["c_ptr", "colsum_part_ptr", "c_copy_ptr", "part_a_ptr", "part_b_ptr",
                                          "part_c_ptr"], "*fp32"),
               "n_rows": "i32", "n_cols": "i32", "stride_t_row": "i32", "inv_teacher_temp": F32, "n_blocks": "i32",
               "rows_per_group": "i32"}
    fwd = {**_ptrs(["s_ptr", "t_ptr"], "*bf16"),
           **_ptrs(["c_ptr", "part_max_ptr", "part_sumexp_ptr", "part_wx_ptr", "t_shift_ptr", "t_scale_ptr",
                    "t_entropy_ptr", "part_a_ptr", "part_b_ptr", "part_c_ptr", "colsum_part_ptr", "colsum_ptr"],
                   "*fp32"),
           **_ptrs(["n_batch", "n_crops", "n_cols", "n_chunks", "n_blocks", "n_groups", "stride_s_row",
                    "stride_t_row"], "i32"),
           **_ptrs(["inv_student_temp", "inv_teacher_temp"], F32)}
    finish = {**_ptrs(["part_max_ptr", "part_sumexp_ptr", "part_wx_ptr", "t_scale_ptr", "t_entropy_ptr", "lse_ptr",
                       "loss_ptr", "entropy_ptr"], "*fp32"),
              **_ptrs(["n_batch", "n_rows", "n_chunks"], "i32"), "loss_scale": F32}
    bwd = {**_ptrs(["s_ptr", "t_ptr"], "*bf16"), "c_ptr": "*fp32", "grad_ptr": "*bf16",
           **_ptrs(["lse_ptr", "t_shift_ptr", "t_scale_ptr", "grad_loss_ptr"], "*fp32"),
           **_ptrs(["n_batch", "n_crops", "n_cols", "stride_s_row", "stride_t_row", "stride_grad_row"], "i32"),
           **_ptrs(["inv_student_temp", "inv_teacher_temp", "grad_scale"], F32)}
    settings = dl._launch_settings(65536, dl.MAX_BLOCK_K["cuda"], dl.MAX_BLOCK_T)
    block_k, warps = settings["block_k"], settings["num_warps"]
    specs = []
    for label, has_center, is_probs, even in [("center", True, False, True), ("probs", False, True, True),
                                              ("center, masked", True, False, False)]:
        specs += [
            (f"teacher_stats ({label})", dl._teacher_stats_kernel, teacher,
             dict(HAS_CENTER=has_center, IS_PROBS=is_probs, BLOCK_R=dl.TEACHER_BLOCK_R, BLOCK_T=settings["block_t"]),
             dl.TEACHER_NUM_WARPS),
            (f"loss fwd ({label})", dl._dino_loss_fwd_kernel, fwd,
             dict(HAS_CENTER=has_center, IS_PROBS=is_probs, EVEN_K=even, BLOCK_K=block_k,
                  BLOCK_P=settings["block_blocks"]), warps),
            (f"loss finish ({label})", dl._dino_loss_finish_kernel, finish,
             dict(IS_PROBS=is_probs, BLOCK_R=dl.FINISH_BLOCK_R, BLOCK_P=settings["block_chunks"]), 4),
            (f"loss bwd ({label})", dl._dino_loss_bwd_kernel, bwd,
             dict(HAS_CENTER=has_center, IS_PROBS=is_probs, EVEN_K=even, BLOCK_K=block_k), warps),
        ]
    ema_sig = {"table_ptr": "*i32", "addr_ptr": "*i64", "numel_ptr": "*i64", "weight": F32, "momentum_ptr": "*fp32"}
    for label, student, aligned in [("fp32/fp32, aligned", tl.float32, True), ("fp32/bf16, aligned", tl.bfloat16, True),
                                    ("fp32/fp32, unaligned", tl.float32, False)]:
        specs.append((f"ema ({label})", ema._ema_update_kernel, ema_sig,
                      dict(T_DTYPE=tl.float32, S_DTYPE=student, MOMENTUM_FROM_PTR=True, ALIGNED=aligned,
                           BLOCK=ema.BLOCK), ema.NUM_WARPS))
    return specs


def compile_sm90(kernel, signature, constexprs, num_warps):
    aligned = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride") or n == "n_cols"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) per thread from `cuobjdump --dump-resource-usage`."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    regs = int(re.search(r"REG:(\d+)", out.stdout).group(1))
    spills = sum(int(n) for n in re.findall(r"(?:STACK|LOCAL):(\d+)", out.stdout))
    return regs, spills


def global_accesses(ptx: str) -> dict:
    """Counts of global loads/stores in the PTX and of the 128-bit ones among them."""
    loads = re.findall(r"ld\.global(?:\.\w+)*", ptx)
    stores = re.findall(r"st\.global(?:\.\w+)*", ptx)
    wide = lambda ops: sum(".v4" in op and (".b32" in op or ".f32" in op) for op in ops)  # noqa: E731
    return dict(loads=len(loads), loads_128=wide(loads), stores=len(stores), stores_128=wide(stores))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: the report compiles the kernels for sm_90")
    print(f"# sm_90 (GPUTarget('cuda', 90, 32)) | triton {triton.__version__} | K=65536, bf16 loss, fp32 EMA teacher")
    print(f"{'kernel':36} | warps | regs | spill B | ld.global (128-bit) | st.global (128-bit)")
    failures = []
    for label, kernel, signature, constexprs, num_warps in kernel_specs():
        compiled = compile_sm90(kernel, signature, constexprs, num_warps)
        regs, spills = resource_usage(compiled.asm["cubin"])
        acc = global_accesses(compiled.asm["ptx"])
        print(f"{label:36} | {num_warps:5} | {regs:4} | {spills:7} | {acc['loads']:10} ({acc['loads_128']:4}) | "
              f"{acc['stores']:10} ({acc['stores_128']:4})")
        if spills:
            failures.append(f"{label}: {spills} bytes of spills")
        if label.startswith("ema") and ("unaligned" in label) == (acc["stores_128"] > 0):
            failures.append(f"{label}: 128-bit stores {acc['stores_128']}, expected them only when aligned")
    if args.check and failures:
        raise SystemExit("\n".join(failures))
    print("compiled")


if __name__ == "__main__":
    main()
