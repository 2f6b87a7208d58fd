"""Device choice shared by every model: the one place that asks torch for a GPU.

One place decides CUDA vs CPU, the dtype and the CPU thread count, so that the embedder, the finetuner and
the evaluator never disagree about where a model lives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

log = logging.getLogger("harp.device")
_ANNOUNCED: set[tuple[str, str, int]] = set()


@dataclass(frozen=True)
class DeviceSpec:
    """A resolved device: where tensors go and which dtype models are loaded in."""

    device: torch.device
    dtype: torch.dtype
    threads: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(device: str = "auto", cpu_threads: int = 0, dtype: str = "auto") -> DeviceSpec:
    """Resolve `device` ("auto", "cpu", "cuda", "cuda:N") to a DeviceSpec and log the choice once.

    `auto` takes CUDA when torch sees a GPU (bf16 where the GPU supports it, else fp16 is avoided in favour
    of fp32 for LoRA stability), else the CPU in fp32 with `cpu_threads` threads (0 keeps torch's default).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but torch sees no CUDA GPU; use device='auto' or 'cpu'")
    dev = torch.device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if dev.type == "cpu" and cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    threads = torch.get_num_threads()
    key = (str(dev), str(torch_dtype), threads)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {threads} threads"
        log.info("models run on %s (%s), dtype %s", dev, name, str(torch_dtype).removeprefix("torch."))
    return DeviceSpec(device=dev, dtype=torch_dtype, threads=threads)


class Device(BaseModel):
    """Where models run: CUDA (bf16 when supported) if torch sees a GPU, else the CPU."""

    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    cpu_threads: int = Field(default=0, description="torch threads on CPU; 0 keeps torch's default")
    dtype: str = Field(default="auto", description="auto, float32, bfloat16 or float16")

    def spec(self) -> DeviceSpec:
        return resolve_device(self.device, self.cpu_threads, self.dtype)
