"""`candor dpo`: direct preference optimization (Rafailov et al. 2023) of a model directory on
prompt/chosen/rejected pairs, into a model directory.

Pairs: trl's preference JSONL (tune/chat_data.py: read_preferences), a hashed
`dpo.holdout_fraction` held out. The reference is the model as loaded: its log-probabilities
of every pair's two completions are computed once, before training (trl's
precompute_ref_log_probs), so no second model is kept in memory; with LoRA the policy is the
reference plus adapters. The loss is tune/losses.py's dpo_loss (checked term for term against
trl's in tests/test_tune_losses.py). Evaluations log, on the held-out pairs, the mean reward
margin beta * ((log pi - log ref)(chosen) - (log pi - log ref)(rejected)), the preference
accuracy (share of pairs with a positive margin), the loss and both rewards.

The loop, schedule, time budget, log and checkpoints are pretraining's (tune/trainer.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from candorlm.config import RunConfig
from candorlm.device import autocast_dtype
from candorlm.errors import CandorError
from candorlm.tokenizer import Tokenizer
from candorlm.tune import trainer
from candorlm.tune.chat_data import Encoded, encode_pairs, make_pair_batch, read_preferences, split_holdout
from candorlm.tune.losses import dpo_loss, sequence_logprobs
from candorlm.tune.sft import PAD_MULTIPLE

Pair = tuple[Encoded, Encoded]


@torch.no_grad()
def pair_logprobs(model, pairs: list[Pair], batch_size: int, pad_id: int, amp=None,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities of the completions, their token counts), each (N, 2): column
    0 the chosen side, 1 the rejected one, in the order of `pairs`."""
    was = model.training
    model.eval()
    logps, tokens = [], []
    for k in range(0, len(pairs), batch_size):
        b = make_pair_batch(pairs[k:k + batch_size], pad_id).to(device)
        with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
            lp, n = sequence_logprobs(model, b.x, b.y)
        logps.append(torch.stack(lp.float().cpu().chunk(2), 1))
        tokens.append(torch.stack(n.cpu().chunk(2), 1))
    model.train(was)
    return torch.cat(logps), torch.cat(tokens)


def _loss(sec, policy: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor):
    return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=sec.beta, loss_type=sec.loss_type,
                    label_smoothing=sec.label_smoothing, chosen_tokens=tokens[:, 0], rejected_tokens=tokens[:, 1])


class DPOObjective(nn.Module):
    """What train_step calls: the policy's DPO loss on a pair batch (2B rows, chosen then
    rejected) against the reference's precomputed log-probabilities ref (B, 2)."""

    def __init__(self, policy: nn.Module, sec):
        super().__init__()
        self.policy, self.sec = policy, sec

    def forward(self, x, y, ref):
        lp, n = sequence_logprobs(self.policy, x, y)
        return _loss(self.sec, torch.stack(lp.chunk(2), 1), ref, torch.stack(n.chunk(2), 1)).loss


def preference_metrics(model, pairs: list[Pair], ref: torch.Tensor, sec, pad_id: int, amp=None,
                       device="cpu") -> dict:
    """The held-out figures: mean reward margin, preference accuracy, loss, mean rewards."""
    policy, tokens = pair_logprobs(model, pairs, sec.batch_size, pad_id, amp, device)
    out = _loss(sec, policy, ref, tokens)
    return {"val_margin": float(out.margins.mean()), "val_accuracy": float(out.accuracy),
            "val_loss": float(out.loss), "val_chosen_reward": float(out.chosen_rewards.mean()),
            "val_rejected_reward": float(out.rejected_rewards.mean()), "val_pairs": len(pairs)}


def _key(p) -> str:
    return json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True, ensure_ascii=False)


def dpo(base_dir: str | Path, pairs_path: str | Path, out_dir: str | Path, cfg: RunConfig | None = None,
        resume: bool = False, quiet: bool = False, stop_at_step: int | None = None) -> dict:
    """Preference-tune the model of base_dir on the pairs of pairs_path into out_dir by cfg.dpo;
    returns the result (steps, the final held-out figures, parameters trained, "data" counts)."""
    cfg = cfg or RunConfig()
    sec = cfg.dpo.check()
    tok = Tokenizer.load(base_dir)
    pairs, read, skipped = read_preferences(pairs_path)
    model, dist = trainer.load_base(base_dir)
    seq_len = trainer.context(sec, model.cfg)
    train_p, held_p = split_holdout(pairs, sec.holdout_fraction, sec.seed, key=_key)
    train, skip_t = encode_pairs(tok, train_p, seq_len + 1)
    held, skip_h = encode_pairs(tok, held_p, seq_len + 1)
    skipped.update(skip_t + skip_h)
    info = {"data": str(pairs_path), "read": read, "train": len(train), "held_out": len(held),
            "skipped": dict(sorted(skipped.items()))}
    if not train:
        raise CandorError(f"dpo pairs {pairs_path}: no pair to train on ({read} records read; "
                          f"skipped: {info['skipped'] or 'none'})")
    pad, amp = tok.special_ids["pad"], autocast_dtype(dist.device, sec.dtype)
    # The reference: the model as loaded, before any step (and before a resume loads trained weights).
    ref_train = pair_logprobs(model, train, sec.batch_size, pad, amp, dist.device)[0]
    ref_held = pair_logprobs(model, held, sec.batch_size, pad, amp, dist.device)[0]

    def make(idx: list[int]):
        b = make_pair_batch([train[i] for i in idx], pad, pad_multiple=PAD_MULTIPLE)
        return b.x, b.y, ref_train[idx]

    lengths = [max(len(c.ids), len(r.ids)) for c, r in train]
    batches = trainer.EpochBatches(lengths, sec.batch_size, sec.grad_accum, sec.seed, True, make)
    batches.mean_tokens *= 2  # both sides of each pair
    cfg.preset, cfg.model = "(the base model's)", model.cfg
    cfg.train = trainer.train_settings(sec, seq_len, batches.per_epoch, sum(len(c.ids) + len(r.ids) for c, r in held))
    if not held:
        cfg.train.eval_every = 0
    run = trainer.set_up(model, dist, base_dir, out_dir, cfg, sec, batches,
                         objective=lambda policy: DPOObjective(policy, sec), resume=resume, quiet=quiet)
    run.say(f"dpo pairs {pairs_path}: {len(train)} for training, {len(held)} held out; "
            f"left out: {info['skipped'] or 'none'}; reference log-probabilities precomputed")

    def evaluate(run) -> dict:
        if not held:
            return {}
        r = preference_metrics(run.model, held, ref_held, sec, pad, run.amp, run.device)
        run.write_log({"step": run.state["step"], "event": "eval", **r})
        return r

    result = trainer.fit(run, evaluate, resume, stop_at_step)
    return {**result, "data": info}
