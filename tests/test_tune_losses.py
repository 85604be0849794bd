"""Post-training losses: the masked cross-entropy against its plain form and the model's fused
head, per-sequence log-probabilities, and DPO against trl's own DPOTrainer code."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from candorlm.errors import CandorError
from candorlm.model.transformer import Transformer
from candorlm.tune.losses import dpo_loss, masked_cross_entropy, sequence_logprobs, sft_loss
from conftest import micro_config, missing


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(micro_config(("model.vocab_size", "300")).model).eval()


def _targets(B=3, T=20, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.5] = -100
    y[1] = -100  # a row with nothing to learn
    return x, y


def test_masked_cross_entropy_is_the_mean_over_learned_tokens():
    x, y = _targets()
    logits = torch.randn(*y.shape, 300)
    keep = y >= 0
    want = F.cross_entropy(logits[keep], y[keep])
    assert masked_cross_entropy(logits, y).item() == pytest.approx(want.item(), rel=1e-6)
    assert masked_cross_entropy(logits, y, "sum").item() == pytest.approx(want.item() * keep.sum().item(), rel=1e-5)
    per = masked_cross_entropy(logits, y, "none")
    assert (per[~keep] == 0).all() and per.shape == y.shape
    none = torch.full_like(y, -100)
    assert masked_cross_entropy(logits, none).item() == 0.0
    assert torch.isnan(F.cross_entropy(logits.flatten(0, 1), none.flatten(), ignore_index=-100))  # what it avoids


def test_sft_loss_through_the_fused_head_equals_the_plain_one(model):
    x, y = _targets()
    with torch.no_grad():
        plain = masked_cross_entropy(model(x), y)
        assert sft_loss(model, x, y).item() == pytest.approx(plain.item(), rel=1e-5)
        assert sft_loss(model, x, torch.full_like(y, -100)).item() == 0.0


def test_sequence_logprobs_sum_the_learned_targets(model):
    x, y = _targets()
    with torch.no_grad():
        logp = torch.log_softmax(model(x), -1)
    want = (logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y >= 0)).sum(-1)
    got, n = sequence_logprobs(model, x, y)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-4)
    assert n.tolist() == (y >= 0).sum(-1).tolist() and got[1].item() == 0.0
    got.sum().backward()  # differentiable for DPO's policy
    assert model.embed.weight.grad is not None


# --- DPO against trl


def _trl_dpo(loss_type, beta, label_smoothing, pol_tok, mask, ref_c, ref_r):
    """trl 1.16's DPOTrainer._compute_loss run on given per-token policy log-probs (2B, T-1),
    zero outside the completion, with precomputed reference log-probs, through stand-ins for
    the model (it returns those log-probs) and the accelerator (one process)."""
    try:
        from trl.trainer.dpo_trainer import DPOTrainer
    except ImportError:
        missing("trl")
    zeros = torch.zeros_like(pol_tok)
    outputs = SimpleNamespace(log_probs=pol_tok, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    acc = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t, unwrap_model=lambda m: m)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list)}, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.1, 0.2),
                                                  ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0)])
def test_dpo_matches_trl(loss_type, beta, eps):
    B, T = 4, 12
    g = torch.Generator().manual_seed(7)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for r in range(2 * B):  # completions of different lengths after a prompt
        mask[r, 1 + r % 4:] = 1
    pol_tok = -torch.rand(2 * B, T - 1, generator=g) * 3 * mask[:, 1:]
    ref_c, ref_r = -torch.rand(B, generator=g) * 20, -torch.rand(B, generator=g) * 20
    trl_loss, metrics = _trl_dpo(loss_type, beta, eps, pol_tok, mask, ref_c, ref_r)
    pol = pol_tok.sum(1)
    n = mask.sum(1)
    ours = dpo_loss(pol[:B], pol[B:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps,
                    chosen_tokens=n[:B], rejected_tokens=n[B:])
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-5)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-5)
    assert ours.margins.mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-5)
    assert ours.accuracy.item() == pytest.approx(metrics["rewards/accuracies"])
    assert 0 < ours.accuracy.item() < 1  # the batch has pairs both ways


def test_dpo_formula_and_gradient_direction():
    pc = torch.tensor([-5.0, -9.0], requires_grad=True)
    pr = torch.tensor([-7.0, -6.0], requires_grad=True)
    rc, rr = torch.tensor([-6.0, -8.0]), torch.tensor([-6.0, -6.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    h = torch.tensor([(-5 + 6) - (-7 + 6), (-9 + 8) - (-6 + 6)])
    assert out.loss.item() == pytest.approx((-F.logsigmoid(0.5 * h)).mean().item())
    assert out.margins.tolist() == pytest.approx((0.5 * h).tolist()) and out.accuracy.item() == 0.5
    out.loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    # conservative DPO: the smoothed sigmoid loss
    e = 0.1
    cdpo = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=e).loss.item()
    assert cdpo == pytest.approx((-(1 - e) * F.logsigmoid(0.5 * h) - e * F.logsigmoid(-0.5 * h)).mean().item())


def test_dpo_settings_are_checked():
    t = torch.zeros(2)
    for kwargs, says in [({"loss_type": "kto"}, "loss_type"), ({"beta": 0}, "beta"),
                         ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
                         ({"loss_type": "ipo"}, "chosen_tokens")]:
        with pytest.raises(CandorError, match=says):
            dpo_loss(t, t, t, t, **kwargs)
