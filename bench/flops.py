"""Model FLOPs of one training step, counted, and the device's dense matrix-product peak.

``training_flops_per_token`` runs one forward + backward of the very model a benchmark
trains (the method applied, so a PEFT method's frozen weights get no weight gradient) under
``torch.utils.flop_counter.FlopCounterMode`` on a batch of ``batch_size`` rows of the
training split's mean real length, and divides by the tokens in it. The count covers the
matrix products (attention included); element-wise work is not counted, as in the usual
model-FLOPs utilisation (MFU). Achieved TFLOP/s = FLOPs per token x real tokens/s, so
padding counts as waste. The optimizer step is not counted (it is O(trainable parameters)).

``matmul_peak_tflops`` times square matrix products on the device in the precision a run
trains in (bf16 on a CUDA GPU, fp32 on a CPU with the benchmark's thread count): the
achievable peak. ``SPEC_PEAK_TFLOPS`` holds the datasheets' dense bf16 figures for the
GPUs this project is lent; MFU is measured against the datasheet where the GPU is known.
"""

from __future__ import annotations

import time

import torch

# dense bf16 tensor-core TFLOP/s from the datasheets (no sparsity), matched on the device name
SPEC_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0))


def spec_peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in SPEC_PEAK_TFLOPS if k in device_name), None)


def training_flops_per_token(model: torch.nn.Module, batch_size: int, length: int, vocab_size: int,
                             num_labels: int, token_type_ids: bool) -> float:
    """FLOPs of forward + backward per token, on a batch of ``batch_size`` x ``length``
    tokens (no padding: the values do not change the count). Gradients are cleared after."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, max(1001, vocab_size - 1), (batch_size, length), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, max(1, num_labels), (batch_size,), generator=gen)}
    if token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(ids)
    batch = {k: v.to(dev) for k, v in batch.items()}
    was_training = model.training
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / (batch_size * length)


def matmul_peak_tflops(n: int | None = None, repeats: int = 10) -> dict:
    """TFLOP/s of ``n`` x ``n`` x ``n`` products on this process's device and threads."""
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"tflops": 2 * n**3 * repeats / seconds / 1e12, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads()}


def peak_in_process(threads: int) -> dict:
    """``matmul_peak_tflops`` with ``threads`` CPU threads (meant for a fresh process)."""
    torch.set_num_threads(threads)
    return matmul_peak_tflops()
