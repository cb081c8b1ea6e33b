"""Where and how a run computes: seeding, the device (and torchrun's process group), the numerics of fp32
matmuls (TF32, deterministic kernels) and the mixed precision of training, evaluation and inference."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def setup_device(cpu: bool = False, num_threads: int | None = None) -> tuple[torch.device, int, int]:
    """(device, rank, world_size). Under torchrun, joins the process group (nccl on GPU, gloo on CPU)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    use_cuda = torch.cuda.is_available() and not cpu
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), rank, world
    return torch.device("cpu"), rank, world


def setup_numerics(device: torch.device, tf32: bool = False, deterministic: bool = False) -> None:
    """--tf32: TF32 matmuls on CUDA (Ampere and later; 10 bits of mantissa in the products, about 2-3x faster
    fp32 training and inference). Off by default, so that fp32 means fp32 on every GPU, as torch's own
    default. --deterministic: torch's deterministic kernels (an error names any op that has none) and, on
    CUDA, cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts: set before any matmul)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def tf32_enabled(device: torch.device) -> bool:
    """Whether fp32 matmuls on `device` run in TF32 (what inference_results.json records)."""
    return device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)


def precision_name(fp16: bool = False, bf16: bool = False) -> str:
    """"fp16", "bf16" or "fp32": the precision of a run's --fp16 / --bf16 (the scripts refuse both at once)."""
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def autocast(precision: str, device_type: str):
    """The autocast context of a precision name ("fp32": none), for training, evaluation and inference alike."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
