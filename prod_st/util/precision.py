"""Which floating-point precision a run computes in: the recipe's `training.precision` (fp32, bf16, fp16, or
auto), resolved once per process, and the trainer flags it means.

`auto` is bf16 where the hardware runs it natively and fast (a CUDA GPU with bf16 support; a CPU with AMX or
AVX512-BF16 instructions, on which bf16 matrix products run 2-4x faster than fp32), else fp32. Evaluation
encodings (dev, test, mining) stay fp32 in every precision: what is measured does not move with it.

torch is imported only inside the functions, so the recipe schema (and `prod-st validate`) stays torch-free."""

from __future__ import annotations

import functools
from pathlib import Path

from prod_st.util.errors import ProdStError

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 arithmetic


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU's flags name AMX-BF16 or AVX512-BF16 (False where /proc/cpuinfo is missing: not Linux)."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in CPU_BF16_FLAGS)


@functools.cache
def resolve_precision(precision: str) -> str:
    """`precision` itself, or for `auto` what this machine runs fastest: bf16 or fp32."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def precision_flags(precision: str) -> dict[str, bool]:
    """The trainer's mixed-precision flags for a recipe's `training.precision` (fp16 needs a CUDA GPU: a one-line
    error here rather than the trainer's traceback), and `use_cpu` where no GPU is visible: bf16 on the CPU
    needs it said, and under torchrun on CPUs accelerate otherwise sees one process on every rank, so each rank
    would train its own copy of the model instead of one data-parallel model (the ranks' students diverge)."""
    import torch

    precision = resolve_precision(precision)
    gpu = torch.cuda.is_available()
    if precision == "fp16" and not gpu:
        raise ProdStError("training.precision: fp16 needs a CUDA GPU and none is visible; use bf16 (runs on CPU "
                          "too), auto or fp32")
    flags = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    return flags | ({"use_cpu": True} if not gpu else {})


def set_tf32(enabled: bool) -> bool:
    """fp32 matrix products (and cuDNN convolutions) in TF32 on a CUDA GPU when `enabled` (the recipe's
    `training.tf32`): 2x the fp32 throughput of an Ampere or later GPU for the work that stays fp32 (evaluation
    encodings, fp32 training), at a 10-bit mantissa in the products' inputs. torch's default leaves matmuls in full
    fp32. No effect without a GPU; returns whether TF32 is now on."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled
