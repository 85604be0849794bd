"""Output head + cross-entropy fused and computed in row chunks, never materialising the
full (tokens x vocab) logits.

Why by hand: with 8k tokens and an 8k vocabulary the plain path allocates ~270 MB of fp32
logits, their log-softmax and its gradient, and makes several memory-bound passes over them.
Here each chunk of rows goes through one fused log-softmax while it is hot in cache
(Liger-Kernel's fused linear cross-entropy):

- a summed or mean loss (training) gets its gradients in the forward pass, chunk by chunk,
  since its gradient is one scalar known to scale them all (`_FusedHeadCESum`);
- per-token losses (`reduction="none"`, whose weights backward brings) recompute each
  chunk's log-softmax in backward (`_FusedHeadCE`).

`naive_head_loss` is the obviously-correct path both are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# 256 rows x 8k vocab x fp32 = 8 MB blocks for the recomputing path.
CHUNK_ROWS = 256
# The summed loss (training) computes its gradients in the forward pass; bigger chunks mean
# fewer grad_w accumulations. Measured on a cpu-tiny head (8k rows, 8k vocab), forward +
# backward: 163 ms compiled at 1024 rows and 160 ms at 256, against 165 ms for the unfused
# logits + F.cross_entropy and 180 ms for the recomputing path above. Eager, the chunk's
# float32 log-softmax, exp_ and cast measured 7.0 ms per 1024 rows; an exp writing bf16
# directly 8.7 ms, a bf16 softmax plus a separate float32 logsumexp 10.5 ms.
SUM_CHUNK_ROWS = 1024


def _chunk_log_probs(x, w, softcap):
    """log-softmax of one chunk's logits in float32, and tanh(z/c) when soft-capped."""
    z = x @ w.t()
    if softcap:
        t = torch.tanh(z.float() / softcap)
        return torch.log_softmax(softcap * t, dim=-1), t
    return torch.log_softmax(z, dim=-1, dtype=torch.float32), None


def _logit_grad(logp, targets, tanh, dtype, row_scale=None):
    """d loss_i / d z_ij = p_ij - [j == t_i] (times row_scale_i), through the soft cap times
    1 - tanh^2, formed in place over logp and cast to the matmul dtype. targets: (rows, 1)."""
    p = logp.exp_()
    p.scatter_add_(1, targets, torch.full((p.shape[0], 1), -1.0, device=p.device))
    if row_scale is not None:
        p.mul_(row_scale)
    if tanh is not None:
        p.mul_(1 - tanh.square())
    return p.to(dtype)


def _chunk_loss_grad_fused(x, w, targets, valid, softcap, dtype):
    """One chunk's summed loss and logit gradient, written for torch.compile (the eager path
    above is in-place ops, which inductor cannot fuse). Inductor makes this two passes over
    the chunk's logits with one exp per element: exp(z - max) is kept in the matmul dtype
    between the row sum and the scaling (the gradient is cast to that dtype anyway), and the
    one-hot is a comparison with an iota instead of a scatter. Against the eager form
    compiled (a float32 log-softmax, a scatter, a cast, two exps): 2.7 vs 3.5 ms per
    1024 x 8192 chunk on the 2-core machine."""
    z = (x @ w.t()).float()
    tanh = None
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    m = z.amax(dim=-1, keepdim=True)
    e = (z - m).exp()
    se = e.sum(dim=-1, keepdim=True)
    lse = m + se.log()
    loss = ((lse - z.gather(1, targets)) * valid).sum()
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == targets
    p = e.to(dtype).float() * (1 / se) - onehot.to(z.dtype)
    if tanh is not None:
        p = p * (1 - tanh.square())
    return loss, p.to(dtype)


class _FusedHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, targets, softcap):
        n = x.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=x.device)
        valid = targets >= 0
        safe_t = targets.clamp(min=0)
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            logp, _ = _chunk_log_probs(x[s:e], w, softcap)
            losses[s:e] = -logp.gather(1, safe_t[s:e, None]).squeeze(1)
        losses = losses.masked_fill(~valid, 0.0)
        ctx.save_for_backward(x, w, safe_t, valid)
        ctx.softcap = softcap
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x, w, t, valid = ctx.saved_tensors
        softcap = ctx.softcap
        g = (grad_losses * valid).to(torch.float32)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        n = x.shape[0]
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            logp, tanh = _chunk_log_probs(x[s:e], w, softcap)
            p = _logit_grad(logp, t[s:e, None], tanh, x.dtype, row_scale=g[s:e, None])
            if gx is not None:
                gx[s:e] = p @ w
            if gw is not None:
                gw.add_((p.t() @ x[s:e]).float())
        return gx, (gw.to(w.dtype) if gw is not None else None), None, None


class _FusedHeadCESum(torch.autograd.Function):
    """The summed loss of the valid rows, with the gradients computed during the forward pass.

    A summed loss gets one scalar as its gradient, so each chunk's logit gradient
    (softmax - one-hot) can be formed while the chunk's logits are at hand and turned into
    its share of grad_x and grad_w right away; backward only scales them. Three head matmuls
    per step instead of four (no recompute), and the logits never outlive their chunk."""

    @staticmethod
    def forward(ctx, x, w, targets, softcap, need_x, need_w):
        n = x.shape[0]
        valid = (targets >= 0)[:, None]
        safe_t = targets.clamp(min=0)[:, None]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        fused = torch.compiler.is_compiling() and (gx is not None or gw is not None)
        for s in range(0, n, SUM_CHUNK_ROWS):
            e = min(s + SUM_CHUNK_ROWS, n)
            if fused:
                loss, p = _chunk_loss_grad_fused(x[s:e], w, safe_t[s:e], valid[s:e], softcap, x.dtype)
                total += loss
            else:
                logp, tanh = _chunk_log_probs(x[s:e], w, softcap)
                total -= logp.gather(1, safe_t[s:e]).squeeze(1).masked_fill(~valid[s:e, 0], 0.0).sum()
                if gx is None and gw is None:
                    continue
                p = _logit_grad(logp, safe_t[s:e], tanh, x.dtype)
            # Ignored rows get no gradient: zero their rows of the (small) x and grad_x
            # rather than of the (chunk x vocab) p.
            if gx is not None:
                gx[s:e] = (p @ w).mul_(valid[s:e])
            if gw is not None:
                gw += p.t() @ (x[s:e] * valid[s:e])
        ctx.save_for_backward(*(g for g in (gx, gw) if g is not None))
        ctx.has = (gx is not None, gw is not None)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        has_x, has_w = ctx.has
        if (ctx.needs_input_grad[0] and not has_x) or (ctx.needs_input_grad[1] and not has_w):
            raise RuntimeError("fused_head_loss: a gradient was asked for that the forward pass did not compute")
        gx = gw = None
        if has_x:
            gx = saved.pop(0) * grad_total  # a 0-dim float32 factor: the product stays in x's dtype
        if has_w:
            gw = (saved.pop(0) * grad_total).to(ctx.w_dtype)
        return gx, gw, None, None, None, None


def fused_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits `x @ weight.T` (optionally soft-capped) against targets
    (ignored where < 0). x: (N, d); weight: (V, d); targets: (N,)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
    else:
        weight = weight.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        if reduction == "none":
            return _FusedHeadCE.apply(x, weight, targets, float(softcap))
        grad = torch.is_grad_enabled()
        total = _FusedHeadCESum.apply(x, weight, targets, float(softcap), grad and x.requires_grad,
                                      grad and weight.requires_grad)
    if reduction == "sum":
        return total
    return total / (targets >= 0).sum().clamp(min=1)


def naive_head_loss(x, weight, targets, softcap: float = 0.0, reduction: str = "mean"):
    z = (x @ weight.t()).float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, ignore_index=-1, reduction=reduction)
