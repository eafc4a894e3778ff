"""Which device a model runs on, and in what precision: one rule for the CLIP and LLM stages.

``auto`` is CUDA when torch sees a GPU, else the CPU. On a machine with several GPUs each model copy (Beam's
``model_copies``, or one per worker process) goes to the GPU with the most free memory when it loads, so copies
spread over the GPUs instead of piling onto the first.
"""

from __future__ import annotations


def pick_device(requested: str) -> str:
    """``"cpu"``, ``"cuda"`` (one GPU) or ``"cuda:N"`` (several) for ``requested`` in auto/cpu/cuda/cuda:N."""
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if requested == "auto":
            return "cpu"
        raise RuntimeError(f"device is {requested!r} but torch sees no CUDA device (is the CUDA build installed?)")
    if requested.startswith("cuda:"):
        return requested
    count = torch.cuda.device_count()
    if count == 1:
        return "cuda"
    free = [torch.cuda.mem_get_info(i)[0] for i in range(count)]
    return f"cuda:{max(range(count), key=lambda i: (free[i], -i))}"  # most free memory; ties to the first


def device_type(device: str) -> str:
    """What ``torch.autocast`` wants: ``"cuda"`` for ``"cuda:1"``."""
    return device.split(":")[0]


def pick_dtype(precision: str, device: str):
    """bf16 on CUDA and fp32 on CPU for ``auto``; else the precision asked for."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device_type(device) == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
