"""Quantized linear and embedding modules: the fused CPU kernels that run them, chosen once when a
quantized model is built, and the dequantize-then-matmul reference each is tested against.

Why these kernels (one linear layer at batch 1, 1 thread, Zen4 AVX512-BF16, a shared machine;
microseconds, best of 7 rounds; `python bench/compress.py --kernels`, docs/benchmarks.md):

    (out, in)    fp32   bf16   int8 module  int8 bare  int8 fp32-act  dequant/call  int4 g32 / g128
    704 x 256    16.1   25.9      23.5        12.3         142.8          31.5        24.1 / 23.8
    8192 x 256  222.7  178.8     140.7       123.5        1690.3         352.7       136.1 / 130.1
    2048 x 768  118.9  176.8     135.9        86.7        1328.5         207.3       104.2 / 102.0

("module": this file's Int8Linear, with its bf16 casts, ~11 us a call over the bare kernel at
these sizes; an nn.Linear call on a (1, 1, in) input costs ~5 us over F.linear too.)

`aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` with bf16 activations are the
fast ones; with fp32 activations both fall to a scalar path 5-15x slower than a plain fp32
matmul. Dequantizing inside every call is 1.6-2x slower than fp32; torchao 0.18's int8
weight-only linear (which does that, eager, leaving the fusion to torch.compile) measured
2.3-2.9x, and a compiled `F.linear(x, q.to(x.dtype)) * scale` 690 us against the bare kernel's
178 at 8192 x 256 (2 threads; per-call overhead). So the kernel follows the machine's
precision: where bf16 is native, the packed kernels ("packed"); elsewhere the weights are
dequantized once at load and run as fp32 ("dequantized": the disk is smaller, memory and speed
are fp32's). CUDA is given "dequantized" too (the packed CUDA kernels are untested here).

A module's `weight` is always the dequantized float32 matrix (the reference): code that reads a
head's weight (the fused loss of evaluation) computes with exactly the quantized values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from candorlm.device import native_bf16
from candorlm.model.quant import dequantize_int4, dequantize_int8, unpack_int4

KERNELS = ("packed", "dequantized", "reference")
def choose_kernel(device: torch.device | str) -> str:
    """The kernel for quantized weights on `device`: "packed" on a CPU with native bf16, else
    "dequantized" (see the module docstring for the figures)."""
    return "packed" if torch.device(device).type == "cpu" and native_bf16() else "dequantized"


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {KERNELS}")
    return kernel


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it at a 64-byte boundary (PyTorch's CPU allocator aligns to 64).
    Tensors read from a safetensors file start wherever the header left them (24 bytes past a
    boundary here), and `_weight_int8pack_mm` crashed (SIGSEGV) on such an int8 weight with more
    than one activation row (torch 2.13; one row ran)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


class Int8Linear(nn.Module):
    """y = x (q * scale)^T: int8 weights with one float32 scale per output row. The packed kernel
    reads inputs 16 at a time (with 100 inputs it returned garbage or crashed, torch 2.13), so
    other sizes run on a copy padded with zero columns, fed zero-padded inputs."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, kernel: str = "reference"):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", aligned(qweight) if kernel == "packed" else qweight)
        self.register_buffer("scale", scale)
        self.kernel = _check_kernel(kernel)
        if kernel == "packed":  # the kernel takes scales in the activations' dtype
            self._pad_in = -self.in_features % 16
            self._packed = F.pad(qweight, (0, self._pad_in)) if self._pad_in else self.qweight
            self.register_buffer("_scale_bf16", scale.to(torch.bfloat16), persistent=False)
        elif kernel == "dequantized":
            self.register_buffer("_dense", self.weight, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, x):
        if self.kernel == "packed":
            x2 = _flat(x, torch.bfloat16)
            if self._pad_in:
                x2 = F.pad(x2, (0, self._pad_in))
            y = torch.ops.aten._weight_int8pack_mm(x2, self._packed, self._scale_bf16)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, (self._dense if self.kernel == "dequantized" else self.weight).to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """An embedding table of int8 rows with one float32 scale per row (token). Tied to the head,
    the same tensors are an Int8Linear's weight: a row's scale serves both uses."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, idx):
        return F.embedding(idx, self.qweight).float() * self.scale[idx].unsqueeze(-1)


class Int4Linear(nn.Module):
    """y = x W^T with W[r, j] = q * scale + minimum over groups of `group_size` inputs, q in
    [0, 15] stored two to a byte (model/quant.py). The packed kernel needs the inputs padded
    to a whole number of groups and the outputs to a multiple of 16 (aten's checks); the pads
    are zero weights fed zero inputs, cut off the result."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, in_features: int,
                 group_size: int, kernel: str = "reference"):
        super().__init__()
        self.out_features, self.in_features, self.group_size = packed.shape[0], in_features, group_size
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)
        self.kernel = _check_kernel(kernel)
        if kernel == "packed":
            self._pad_in = -in_features % group_size
            pad_out = -self.out_features % 16
            q = F.pad(unpack_int4(packed, in_features).to(torch.int32), (0, self._pad_in, 0, pad_out))
            self.register_buffer("_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
            # aten's form: (q - 8) * scale + zero, so zero = minimum + 8 * scale; (groups, out, 2)
            sz = torch.stack([scale, minimum + 8 * scale], dim=-1).transpose(0, 1)
            self.register_buffer("_scale_zero", F.pad(sz, (0, 0, 0, pad_out)).to(torch.bfloat16).contiguous(),
                                 persistent=False)
        elif kernel == "dequantized":
            self.register_buffer("_dense", self.weight, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scale, self.minimum, self.in_features, self.group_size)

    def forward(self, x):
        if self.kernel == "packed":
            x2 = _flat(x, torch.bfloat16)
            if self._pad_in:
                x2 = F.pad(x2, (0, self._pad_in))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size, self._scale_zero)
            if y.shape[1] != self.out_features:
                y = y[:, :self.out_features]
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, (self._dense if self.kernel == "dequantized" else self.weight).to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.kernel}")
