"""The embedding lookup whose weight gradient is one `index_add_`, opaque to torch.compile.

Why by hand: inductor decomposes the embedding backward into an accumulating `index_put` with
atomic adds, 5.9 ms for a cpu-tiny batch (8,192 tokens x 256) against 0.4 ms for one
`index_add_` on 2 Zen4 cores (docs/benchmarks.md). A custom op keeps it out of inductor's reach.
Plain implementation it is tested against: F.embedding (nn.Embedding's backward).
The model uses it on CPU only (Transformer.use_device); elsewhere nn.Embedding's own kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


@torch.library.custom_op("candorlm::embedding_grad", mutates_args=())
def _embedding_grad(grad: torch.Tensor, idx: torch.Tensor, num: int) -> torch.Tensor:
    d = grad.shape[-1]
    return grad.new_zeros(num, d).index_add_(0, idx.reshape(-1), grad.reshape(-1, d))


@_embedding_grad.register_fake
def _(grad, idx, num):
    return grad.new_empty(num, grad.shape[-1])


class _EmbeddingLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.num = weight.shape[0]
        return F.embedding(idx, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return None, _embedding_grad(grad, idx, ctx.num)


def embedding(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding(idx, weight) with the index_add_ backward."""
    return _EmbeddingLookup.apply(idx, weight)
