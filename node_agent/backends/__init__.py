"""Model backends: TorchScript (CPU and CUDA) and TensorRT (NVIDIA GPUs)."""
