"""The memory budget of a device: configured on CPU, the device's total minus a reserve on CUDA."""

from __future__ import annotations

import pytest
import torch

from node_agent.runtime.memory_budget import device_budget_bytes


def test_device_budget() -> None:
    assert device_budget_bytes("cpu", cpu_budget_bytes=123) == 123
    with pytest.raises(ValueError):
        device_budget_bytes("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_budget_on_gpu() -> None:
    _free, total = torch.cuda.mem_get_info(0)
    assert device_budget_bytes("cuda:0", reserve_bytes=2**30) == total - 2**30
