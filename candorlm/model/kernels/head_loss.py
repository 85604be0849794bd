"""Output head + cross-entropy computed in row chunks, never materialising the full
(tokens x vocab) logits.

Why by hand: with 8k tokens and an 8k vocabulary the plain path allocates ~270 MB of fp32
logits, their log-softmax and its gradient, and makes several memory-bound passes over them.
Here each chunk of rows goes through one fused log-softmax while it is hot in cache
(Liger-Kernel's fused linear cross-entropy):

- a summed or mean loss (training) gets its gradients in the forward pass, chunk by chunk,
  since its gradient is one scalar known to scale them all (`_FusedHeadCESum`): three head
  matmuls a step instead of four; forward + backward 160 ms compiled at cpu-tiny's head
  (8k rows, 8k vocab) against 165 ms for logits + F.cross_entropy (2 Zen4 cores);
- per-token losses without gradients (evaluation) are the plain computation chunk by chunk
  (`per_token_losses`), which keeps one chunk's logits instead of all of them;
- per-token losses with gradients (no caller today) take the plain path.

Measured at cpu-tiny's head (8,192 tokens, d 256, vocab 8,192; `bench/head_loss.py`, eager, 2
Zen4 cores with AVX512-BF16 under a load of ~7.6, so absolute times are ~4x a quiet machine's;
bf16 / fp32): per-token losses in 2048-row chunks 415 / 711 ms and +321 / +329 MB against
383 / 616 ms and +627 / +519 MB for the plain path; 256-row chunks 699 / 1,267 ms at
+45 / +65 MB. A third path, per-token losses whose backward recomputed each chunk's logits,
took 2-4x the plain path's time for 1/15 of its memory with gradients and had no caller:
removed (it is in the history if a per-sequence objective such as DPO needs it at scale).

`naive_head_loss` is the obviously-correct path these are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Per-token losses: chunks of ~16M logits (2048 rows at an 8k vocabulary, 64 MB in fp32), see
# the figures above; 256-row chunks (the earlier choice) took 1.8x the plain path's time.
CHUNK_LOGITS = 1 << 24
# The summed loss (training) computes its gradients in the forward pass; bigger chunks mean
# fewer grad_w accumulations. Measured on a cpu-tiny head (8k rows, 8k vocab), forward +
# backward: 163 ms compiled at 1024 rows and 160 ms at 256, against 165 ms for the unfused
# logits + F.cross_entropy and 180 ms for a path recomputing the logits in backward. Eager,
# the chunk's float32 log-softmax, exp_ and cast measured 7.0 ms per 1024 rows; an exp writing
# bf16 directly 8.7 ms, a bf16 softmax plus a separate float32 logsumexp 10.5 ms.
SUM_CHUNK_ROWS = 1024


def _chunk_log_probs(x, w, softcap):
    """log-softmax of one chunk's logits in float32, and tanh(z/c) when soft-capped."""
    z = x @ w.t()
    if softcap:
        t = torch.tanh(z.float() / softcap)
        return torch.log_softmax(softcap * t, dim=-1), t
    return torch.log_softmax(z, dim=-1, dtype=torch.float32), None


def _logit_grad(logp, targets, tanh, dtype):
    """d loss_i / d z_ij = p_ij - [j == t_i], through the soft cap times 1 - tanh^2, formed
    in place over logp and cast to the matmul dtype. targets: (rows, 1)."""
    p = logp.exp_()
    p.scatter_add_(1, targets, torch.full((p.shape[0], 1), -1.0, device=p.device))
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


def per_token_losses(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     softcap: float = 0.0) -> torch.Tensor:
    """Each row's cross-entropy (0 where targets < 0), chunk by chunk, without gradients."""
    n = x.shape[0]
    rows = max(1, CHUNK_LOGITS // weight.shape[0])
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    valid = targets >= 0
    safe_t = targets.clamp(min=0)[:, None]
    with torch.no_grad():
        for s in range(0, n, rows):
            e = min(s + rows, n)
            logp, _ = _chunk_log_probs(x[s:e], weight, softcap)
            losses[s:e] = -logp.gather(1, safe_t[s:e]).squeeze(1)
    return losses.masked_fill_(~valid, 0.0)


def fused_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
              reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits `x @ weight.T` (optionally soft-capped) against targets
    (ignored where < 0). x: (N, d); weight: (V, d); targets: (N,). reduction: mean | sum | none."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
    else:
        weight = weight.to(x.dtype)
    grad = torch.is_grad_enabled()
    with torch.autocast(x.device.type, enabled=False):
        if reduction == "none":
            if grad and (x.requires_grad or weight.requires_grad):
                return naive_head_loss(x, weight, targets, softcap, "none")
            return per_token_losses(x, weight, targets, softcap)
        total = _FusedHeadCESum.apply(x, weight, targets, float(softcap), grad and x.requires_grad,
                                      grad and weight.requires_grad)
    if reduction == "sum":
        return total
    return total / (targets >= 0).sum().clamp(min=1)


def naive_head_loss(x, weight, targets, softcap: float = 0.0, reduction: str = "mean"):
    """The plain computation: all logits in float32, then F.cross_entropy; targets < 0 are
    ignored (0 loss, left out of the mean), as in the fused paths (-1 from the shards, -100 from
    the chat loss masks)."""
    z = (x @ weight.t()).float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = targets >= 0
    losses = F.cross_entropy(z, targets.clamp(min=0), reduction="none") * valid
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)
