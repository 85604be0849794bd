"""Post-training losses: the masked SFT cross-entropy, per-sequence log-probabilities of
targets under a model, and the DPO family (sigmoid, robust, IPO). No optimizer or loop here.

Targets follow the model's convention (model/transformer.py): a target < 0 is not learned
(chat_data.IGNORE_INDEX = -100). Every mean is over learned tokens and is 0, not NaN, when a
batch has none (F.cross_entropy's own "mean" divides by zero there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from candorlm.errors import CandorError


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), over targets >= 0: their
    mean ("mean"; 0 with none), sum ("sum") or per token ("none", 0 where ignored). The
    plain path; `sft_loss` gives the same through the model's fused head."""
    valid = targets >= 0
    per = F.cross_entropy(logits.flatten(0, -2).float(), targets.clamp(min=0).flatten(), reduction="none")
    per = per.view(targets.shape) * valid
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / valid.sum().clamp(min=1)


def sft_loss(model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The SFT loss of a batch through the model's fused output head (never materialising
    the logits): the mean over learned tokens, 0 with none. With gradient accumulation take
    reduction="sum" and divide by the learned tokens of all micro-batches (`Batch.tokens`),
    so every token weighs the same whatever batch it fell in."""
    return model(x, y, reduction=reduction)


def sequence_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(y_t | x_<=t) over the learned targets of each row, their number): two
    (B,) tensors, the first float32 and differentiable. DPO's log pi(completion | prompt)."""
    per_token = model(x, y, reduction="none").float()  # cross-entropy, 0 where y < 0
    return -per_token.sum(-1), (y >= 0).sum(-1)


DPO_LOSSES = ("sigmoid", "robust", "ipo")


@dataclass
class DPOOutput:
    """loss: scalar (mean over pairs); rewards beta * (log pi - log pi_ref) per pair, detached;
    margins = chosen - rejected rewards; accuracy: the share of pairs with a positive margin."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> DPOOutput:
    """Direct Preference Optimization (Rafailov et al. 2023) from per-sequence summed
    log-probabilities (B,) of the chosen and rejected completions under the policy and the
    frozen reference (`sequence_logprobs`). With h = (log pi_c - log ref_c) - (log pi_r - log ref_r):

    sigmoid  -log sigmoid(beta h): the paper's loss. label_smoothing e > 0 gives conservative
             DPO (Mitchell 2023): -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h).
    robust   the unbiased loss under labels flipped with probability e (Chowdhury et al. 2024):
             (-(1-e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e), e in [0, 0.5).
    ipo      (h' - 1/(2 beta))^2 (Azar et al. 2023, eq. 17) with h' from per-token averages of
             the log-ratios, as trl does; needs chosen_tokens and rejected_tokens (B,).

    sigmoid (e = 0), robust and ipo are trl 1.16's DPOTrainer losses of those names, term for
    term (tests/test_tune_losses.py runs trl's own code on the same numbers)."""
    if loss_type not in DPO_LOSSES:
        raise CandorError(f"dpo loss_type={loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    if not beta > 0:
        raise CandorError(f"dpo beta={beta} must be > 0")
    top = 0.5 if loss_type == "sigmoid" else 0.5 - 1e-12
    if not 0 <= label_smoothing <= top or (label_smoothing and loss_type == "ipo"):
        raise CandorError(f"dpo label_smoothing={label_smoothing} must be in [0, 0.5] for sigmoid, "
                          "[0, 0.5) for robust, 0 for ipo")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise CandorError("dpo loss_type='ipo' needs chosen_tokens and rejected_tokens (completion lengths)")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        z = beta * (chosen_ratio - rejected_ratio)
        e = label_smoothing
        if loss_type == "sigmoid":
            losses = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
        else:
            losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    margins = chosen_rewards - rejected_rewards
    return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards, margins, (margins > 0).float().mean())
