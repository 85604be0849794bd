"""Memory per rank for each preset: parameters; weights + gradients + optimizer states under
DDP and FSDP at N ranks; and activations at the preset's micro-batch and sequence length,
with and without activation checkpointing. docs/scaling.md quotes its output.

Parameters are counted on a meta-device model (no memory). Activations are measured, not
estimated from a formula: the bytes autograd saves for backward (saved-tensor hooks) in a
bf16-autocast forward on CPU, for 1 and 2 layers at 1 and 2 sequences; the four numbers give
the per-layer and per-sequence terms, which are then scaled to the preset. CUDA kernels save
the same tensors give or take a workspace (SDPA's flash kernels also keep no T x T scores).
Not counted: allocator fragmentation, NCCL/gloo buffers, the CUDA context (~0.5-1 GiB/GPU).

    python bench/memory_estimates.py [--ranks 2 8] [--presets cpu-tiny cpu-small gpt2-small 1b]

Last line: JSON with every number (bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from candorlm.config import build_config
from candorlm.model.transformer import Transformer
from candorlm.train.optim import is_hidden_matrix

GiB = 2**30


def param_counts(mc) -> dict:
    with torch.device("meta"):
        m = Transformer(mc)
    named = list(m.named_parameters())  # a tied head is listed once
    block = sum(p.numel() for p in m.layers[0].parameters())
    total = sum(p.numel() for _, p in named)
    hidden = sum(p.numel() for n, p in named if is_hidden_matrix(n, p))
    return {"total": total, "hidden_matrices": hidden, "block": block, "root": total - mc.n_layers * block}


def state_bytes(c: dict, optimizer: str) -> int:
    """fp32 weights (4 B) + fp32 gradients (4 B) + optimizer states: AdamW keeps two fp32
    moments (8 B); Muon one fp32 momentum (4 B) for hidden matrices, AdamW for the rest."""
    opt = 8 * c["total"] if optimizer == "adamw" else 4 * c["hidden_matrices"] + 8 * (c["total"] - c["hidden_matrices"])
    return 8 * c["total"] + opt


def saved_bytes(mc, layers: int, batch: int, seq: int) -> int:
    """Bytes autograd keeps for backward in one bf16-autocast forward + loss (parameters excluded)."""
    cfg = dataclasses.replace(mc, n_layers=layers, vocab_size=512)  # the fused head saves no logits
    torch.manual_seed(0)
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x[:, :-1], x[:, 1:])
    del loss
    return sum(seen.values())


def activation_model(mc, seq: int) -> dict:
    """Fit M(L, b) = c0 + c1 L + b (a0 + a1 L) to four measurements. c0 + c1 L is what does not
    grow with the batch: autocast's bf16 copies of the weights (kept for backward)."""
    m = {(L, b): saved_bytes(mc, L, b, seq) for L in (1, 2) for b in (1, 2)}
    a1 = (m[2, 2] - m[1, 2]) - (m[2, 1] - m[1, 1])
    a0 = (m[1, 2] - m[1, 1]) - a1
    c1 = (m[2, 1] - m[1, 1]) - a1
    c0 = m[1, 1] - c1 - a0 - a1
    return {"per_seq_per_layer": a1, "per_seq_base": a0, "weight_copies_per_layer": c1, "weight_copies_base": c0}


def estimate(preset: str, ranks: list[int]) -> dict:
    cfg = build_config(preset)
    mc, tc = cfg.model, cfg.train
    c = param_counts(mc)
    act = activation_model(mc, tc.seq_len)
    B, L, T = tc.batch_size, mc.n_layers, tc.seq_len
    acts = B * (act["per_seq_base"] + L * act["per_seq_per_layer"])
    # Checkpointed: each block keeps its fp32 input; one block's activations live during its recompute.
    acts_ckpt = B * (act["per_seq_base"] + L * T * mc.d_model * 4 + act["per_seq_per_layer"])
    copies = act["weight_copies_base"] + L * act["weight_copies_per_layer"]
    r = {"preset": preset, "params": c["total"], "params_hidden_matrices": c["hidden_matrices"],
         "micro_batch": B, "seq_len": T, "optimizer": tc.optimizer,
         "activations": acts, "activations_checkpointed": acts_ckpt, "activation_fit": act}
    for opt in ("muon", "adamw"):
        s = state_bytes(c, opt)
        # DDP: every rank holds everything, plus autocast's bf16 weight copies for backward.
        r[f"ddp_{opt}"] = s + copies
        for n in ranks:
            # FSDP (bf16 mixed precision): 1/N of the states, plus whole bf16 parameters and
            # gradients (+ an fp32 reduce buffer) for the root and ~2 blocks in flight.
            r[f"fsdp{n}_{opt}"] = s // n + (c["root"] + 2 * c["block"]) * (2 + 2 + 4)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["cpu-tiny", "cpu-small", "gpt2-small", "1b"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 8])
    args = ap.parse_args()
    rows = [estimate(p, args.ranks) for p in args.presets]
    g = lambda b: f"{b / GiB:.2f}" if b < 10 * GiB else f"{b / GiB:.1f}"  # noqa: E731
    print("GiB per rank. States = fp32 weights + grads + optimizer (Muon on hidden matrices, AdamW on the rest;")
    print("AdamW alone in brackets). DDP adds autocast's bf16 weight copies. Activations per micro-batch.\n")
    head = ["preset", "params", "batch x seq", "DDP"] + [f"FSDP x{n}" for n in args.ranks] + ["activations", "with AC"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['micro_batch']} x {r['seq_len']}",
                 f"{g(r['ddp_muon'])} ({g(r['ddp_adamw'])})"]
        cells += [f"{g(r[f'fsdp{n}_muon'])} ({g(r[f'fsdp{n}_adamw'])})" for n in args.ranks]
        cells += [g(r["activations"]), g(r["activations_checkpointed"])]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
