"""The GPUs the step model (estimate.py) knows, and its efficiency constants; no torch here, so that
`fastdino estimate --help` can list them at once."""
from dataclasses import dataclass

FLOP_EFFICIENCY = 0.60
"""Share of the peak matrix-product rate an op reaches in the model."""
HBM_EFFICIENCY = 0.75
"""Share of the HBM bandwidth an op reaches in the model."""
ALLOCATION_BYTES = 512
"""CUDA caching allocator block granularity: every allocation is rounded up to a multiple of it."""


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: dict
    """Dense matrix-product TFLOP/s by operand dtype (fp32 without TF32, torch's default)."""
    hbm_tb_s: float
    """HBM bandwidth the model uses, TB/s."""
    cublas_workspace_mib: float
    """cuBLAS workspace torch allocates through the caching allocator (32 MiB on Hopper, 8 MiB before)."""
    source: str


GPUS = {
    "h100": GPU("H100 80GB HBM3 (SXM)", {"bf16": 790, "fp16": 790, "fp32": 67}, 3.0, 32,
                "bf16 790 TFLOP/s and 3.0 TB/s measured on the lent H100 (shared/gpu/README.md: matrix products, "
                "device copies); fp32 67 TFLOP/s: NVIDIA H100 SXM datasheet"),
    "h200": GPU("H200 141GB HBM3e (SXM)", {"bf16": 790, "fp16": 790, "fp32": 67}, 4.3, 32,
                "bf16 790 TFLOP/s and 4.3 TB/s copy as stated for the lent H200 (shared/gpu/README.md); fp32 67 "
                "TFLOP/s: NVIDIA H200 datasheet"),
    "a100": GPU("A100 80GB (SXM)", {"bf16": 312, "fp16": 312, "fp32": 19.5}, 1.9, 8,
                "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense, 19.5 fp32, 2.04 TB/s HBM2e, of which 1.9 TB/s "
                "(about what a device copy reaches) is used; not measured here"),
}
