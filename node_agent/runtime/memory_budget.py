"""How many bytes of a device the model scheduler may fill: `device_budget_bytes`.

torch is imported only to ask a CUDA device for its memory, so the CPU path never loads it.
"""

from __future__ import annotations

__all__ = ["device_budget_bytes"]


def device_budget_bytes(
    device: str,
    *,
    reserve_bytes: int = 512 * 2**20,
    cpu_budget_bytes: int = 2 * 2**30,
) -> int:
    """The memory budget for models on `device`.

    CUDA: the device's total memory minus `reserve_bytes` (CUDA context, allocator slack,
    activations of concurrent batches); 512 MiB fits a Jetson-class box's context with
    headroom. CPU: `cpu_budget_bytes`, a configured figure (the host's RAM is shared).
    """
    if reserve_bytes < 0 or cpu_budget_bytes < 0:
        raise ValueError("reserve_bytes and cpu_budget_bytes must be >= 0")
    if device.startswith("cuda"):
        import torch

        _free, total = torch.cuda.mem_get_info(torch.device(device))
        return max(int(total) - reserve_bytes, 0)
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda[:N]'")
    return cpu_budget_bytes
