"""Ahead-of-time report of fastdino's Triton kernels as the training step launches them, for sm_90 (H100/H200) and
sm_80 (A100), on any machine: no GPU needed.

Each entry of LAUNCHES calls a public launcher (`dino_loss`, `ema_update_`, ...) the way the step does, at the step's
shapes, on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes, strides and storage offsets, no memory).
Triton's own launch path then runs as at a real launch: its binder specialises every argument from its value (ints
equal to 1 or divisible by 16, pointers 16-byte aligned; a fake tensor's address is its storage offset in bytes, as
on a fresh allocation, which CUDA's caching allocator aligns to 512 bytes) and the kernel compiles for the target a
stand-in driver names; only the launch itself is skipped. `cuobjdump --dump-resource-usage` (from the Triton wheel)
reads registers and spills off the cubin, and the PTX gives the global loads/stores and how many are 128-bit.

    python benchmarks/aot_report.py                    # sm_90 and sm_80
    python benchmarks/aot_report.py --arch 90 --check  # also fail on spills, or on EMA accesses that are not
                                                       # 128-bit exactly when aligned (the tests run this)
Run it without TRITON_INTERPRET (the kernels must be real JIT functions). To report a new kernel, add an entry to
LAUNCHES: a label and a function that calls its public launcher on `fake_cuda` tensors, backward included.
"""
import argparse
import contextlib
import math
import os
import re
import subprocess
import tempfile
import warnings

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# The step the numbers describe: ViT-S/16 at batch 128 per GPU, 2 global + 10 local crops, K=65536 prototypes.
BATCH, CROPS, K = 128, 12, 65536
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
ARCHS = {90: "sm_90 (H100/H200)", 80: "sm_80 (A100)"}


def fake_cuda(*shape, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    """A CUDA tensor without memory (call inside the report's FakeTensorMode)."""
    return torch.empty(shape, device="cuda", dtype=dtype, requires_grad=requires_grad)


def backward(output: torch.Tensor) -> None:
    """Runs the backward of the autograd node that made `output` (a loss, or a kernel's output) with gradient 1 for
    each element. The autograd engine itself needs a CUDA device for CUDA tensors, so the node is applied directly."""
    node = output.grad_fn
    node.apply(torch.ones_like(output), *[None] * (len(node._input_metadata) - 1))  # one gradient per output


def loss_launch(teacher_is_probs: bool = False, n_cols: int = K):
    def launch():
        from fastdino.kernels import dino_loss

        student = fake_cuda(CROPS * BATCH, n_cols, dtype=torch.bfloat16, requires_grad=True)  # (V*B, K)
        teacher = fake_cuda(2 * BATCH, n_cols, dtype=torch.bfloat16)  # (2*B, K)
        center = None if teacher_is_probs else fake_cuda(1, n_cols)
        loss, _ = dino_loss(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP, CROPS,
                            teacher_is_probs=teacher_is_probs, impl="triton")
        backward(loss)
    return launch


# The iBOT term of the DINOv2 step at ViT-S/14, batch 128: about 9,760 masked patches, bottleneck D = 256.
IBOT_ROWS, HEAD_DIM = 9760, 256


def head_loss_launch(pairing: str):
    """`fused_head_loss` forward + backward: bf16 bottleneck features, fp32 last-layer weights and gains."""
    def launch():
        from fastdino.kernels import fused_head_loss

        rows_s, rows_t = (CROPS * BATCH, 2 * BATCH) if pairing == "crops" else (IBOT_ROWS, IBOT_ROWS)
        h_s = fake_cuda(rows_s, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
        v_s, g_s = fake_cuda(K, HEAD_DIM, requires_grad=True), fake_cuda(K, requires_grad=pairing == "rows")
        h_t, v_t = fake_cuda(rows_t, HEAD_DIM, dtype=torch.bfloat16), fake_cuda(K, HEAD_DIM)
        extra = dict(ncrops=CROPS) if pairing == "crops" else dict(row_weights=fake_cuda(rows_s))
        loss, _, _ = fused_head_loss(h_s, v_s, h_t, v_t, fake_cuda(K), STUDENT_TEMP, TEACHER_TEMP, pairing=pairing,
                                     student_gain=g_s, teacher_gain=fake_cuda(K), impl="triton", **extra)
        backward(loss)
    return launch


def sinkhorn_launch():
    """`sinkhorn_center` of the iBOT teacher: 3 iterations, column and row steps."""
    from fastdino.kernels import sinkhorn_center

    h_t = fake_cuda(IBOT_ROWS, HEAD_DIM, dtype=torch.bfloat16)
    sinkhorn_center(h_t, fake_cuda(K, HEAD_DIM), TEACHER_TEMP, teacher_gain=fake_cuda(K), impl="triton")


def mlp_launch(scale: bool = True):
    """`gelu_mlp_residual` forward + backward at one ViT-S/16 student block: T = 128 x (2 x 197 + 10 x 37) tokens,
    D = 384, hidden 1536, bf16, with the stochastic-depth row scale or without."""
    def launch():
        from fastdino.kernels import gelu_mlp_residual

        rows, dim, hidden = BATCH * (2 * 197 + (CROPS - 2) * 37), 384, 1536
        tensors = [fake_cuda(*shape, dtype=torch.bfloat16, requires_grad=True)
                   for shape in ((rows, dim), (rows, dim), (hidden, dim), (hidden,), (dim, hidden), (dim,))]
        row_scale = fake_cuda(rows, 1, dtype=torch.bfloat16) if scale else None
        backward(gelu_mlp_residual(*tensors, row_scale, impl="triton"))
    return launch


def ema_launch(student_dtype: torch.dtype, aligned: bool = True):
    """The trainer's EMAUpdate over the parameters of ViT-S/16 + its DINO head, fp32 teacher, a 0-d momentum tensor;
    unaligned: each tensor a view one element into a larger buffer. (Not `ema_update_`: its plan cache is keyed on
    data pointers, which fake tensors do not have.)"""
    from fastdino.engine.head import DINOHead
    from fastdino.engine.vit import build_backbone
    from fastdino.kernels import EMAUpdate

    with torch.device("meta"):  # built here, outside the report's FakeTensorMode, which cannot run `.tolist()`
        backbone = build_backbone("vit_small", 16)
        shapes = [p.shape for m in (backbone, DINOHead(backbone.embed_dim, K)) for p in m.parameters()]

    def launch():
        def tensors(dtype):
            offset = 0 if aligned else 1
            return [fake_cuda(math.prod(s) + offset, dtype=dtype)[offset:].view(s) for s in shapes]
        EMAUpdate(tensors(torch.float32), tensors(student_dtype), impl="triton")(fake_cuda())
    return launch


def update_launch(mode: str = "per_tensor"):
    """The Triton update after backward (engine/update.py) over the parameters of ViT-S/16 + its DINO head: clip
    coefficients, AdamW with them and a skip flag, the step statistics with the center (fp32 throughout)."""
    from fastdino.engine.head import DINOHead
    from fastdino.engine.vit import build_backbone

    with torch.device("meta"):  # built outside the report's FakeTensorMode, as for the EMA
        backbone = build_backbone("vit_small", 16)
        shapes = [p.shape for m in (backbone, DINOHead(backbone.embed_dim, K)) for p in m.parameters()]

    def launch():
        from fastdino.kernels import adamw_step_, clip_coefficients, step_stats_update_

        params, grads, moments, squares = ([fake_cuda(*s) for s in shapes] for _ in range(4))
        steps = [fake_cuda() for _ in shapes]
        lr, wd = fake_cuda(), fake_cuda()
        coefficients, norm, skip = clip_coefficients(grads, 3.0, mode, impl="triton")
        adamw_step_(params, grads, moments, squares, steps, [lr] * len(shapes), [wd] * len(shapes),
                    betas=(0.9, 0.999), eps=1e-8, grad_coefficients=coefficients, skip=skip, zero_grads=True,
                    impl="triton")
        step_stats_update_(fake_cuda(7), fake_cuda(), fake_cuda(), norm, skip, fake_cuda(), fake_cuda(),
                           fake_cuda(1, K), fake_cuda(1, K), impl="triton")
    return launch


# (label, launch). The kernels helper's entries go here too: one line per launcher variant the step uses.
LAUNCHES = [
    ("loss, centering", loss_launch()),
    ("loss, teacher probabilities", loss_launch(teacher_is_probs=True)),
    ("loss, centering, K=65520 (masked)", loss_launch(n_cols=65520)),
    ("loss, centering, K=65000 (rows unaligned)", loss_launch(n_cols=65000)),
    ("head+loss, crops (DINO)", head_loss_launch("crops")),
    ("head+loss, rows (iBOT, 9760 rows)", head_loss_launch("rows")),
    ("sinkhorn_center (iBOT, 9760 rows)", sinkhorn_launch),
    ("mlp backward, drop-path scale", mlp_launch()),
    ("mlp backward, no scale", mlp_launch(scale=False)),
    ("ema fp32/fp32, aligned", ema_launch(torch.float32)),
    ("ema fp32/bf16, aligned", ema_launch(torch.bfloat16)),
    ("ema fp32/fp32, unaligned", ema_launch(torch.float32, aligned=False)),
    ("update: clip (per tensor), adamw, step stats", update_launch()),
    ("update: clip (global), adamw, step stats", update_launch("global")),
]


class StandInDriver:
    """What Triton's launch path asks the active driver for (device, stream, target), without a GPU. The device
    index is the arch: Triton caches its binder, and with it the target, per device."""

    def __init__(self, arch: int):
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(compiled: list):
    """Every `kernel[grid](...)` runs Triton's launch path up to the compiled kernel, which goes into `compiled` as
    (kernel name, CompiledKernel), and does not launch; tensors are fake CUDA tensors."""
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_instead
    try:
        with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
            warnings.simplefilter("ignore")  # FakeTensor.data_ptr() is deprecated; its offset is what we want
            yield
    finally:
        JITFunction.run = run


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


def report(arch: int, launches: list) -> list[str]:
    """Prints the table of `launches` for `arch`; returns what --check fails on."""
    print(f"# {ARCHS[arch]} | triton {triton.__version__} | torch {torch.__version__} | as launched at batch "
          f"{BATCH}, {CROPS} crops, K={K}, bf16 logits; EMA over ViT-S/16 + head")
    print(f"{'launch':42} | {'kernel':26} | warps | regs | spill B | ld.global (128-bit) | st.global (128-bit)")
    failures = []
    driver.set_active(StandInDriver(arch))
    for label, launch in launches:
        compiled = []
        with compile_only(compiled):
            launch()
        for name, kernel in dict(compiled).items():  # one row per kernel (a launcher may call one twice)
            regs, spills = resource_usage(kernel.asm["cubin"])
            acc = global_accesses(kernel.asm["ptx"])
            print(f"{label:42} | {name.removeprefix('_'):26} | {kernel.metadata.num_warps:5} | {regs:4} | "
                  f"{spills:7} | {acc['loads']:10} ({acc['loads_128']:4}) | {acc['stores']:10} "
                  f"({acc['stores_128']:4})")
            if spills:
                failures.append(f"sm_{arch} {label} {name}: {spills} bytes of spills")
            if label.startswith("ema") and ("unaligned" in label) == (acc["stores_128"] > 0):
                failures.append(f"sm_{arch} {label}: 128-bit stores {acc['stores_128']}, expected them only "
                                f"when aligned")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS, reverse=True))
    parser.add_argument("--only", nargs="+", default=None, help="launches whose label contains one of these")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: the report compiles the kernels for the GPU")
    launches = [(label, launch) for label, launch in LAUNCHES if not args.only or any(o in label for o in args.only)]
    failures = [f for arch in args.arch for f in report(arch, launches)]
    if args.check and failures:
        raise SystemExit("\n".join(failures))
    print("compiled")


if __name__ == "__main__":
    main()
