"""Training throughput and MFU of candorlm's transformer against `transformers`' Qwen3ForCausalLM
of the same shape, measured in one run on this machine; optionally 2-process DDP scaling.

Both models train in one process with the same optimizer (AdamW), batch, sequence length,
precision (bf16 autocast where the CPU has it) and allocator setting (candorlm's
`configure_cpu_allocator` is process-wide), so the ratio isolates the model implementation.
MFU = (training FLOPs/token x tokens/s) / the bf16 matmul rate measured here at start.

    python bench/train_throughput.py [--preset cpu-tiny] [--set train.seq_len=512 ...] [--steps 8]
                                     [--no-compile] [--ddp]

Each model runs eager and under torch.compile (~30 s of compiling each); `ratio` compares
like with like (eager with eager), `ratio_compiled` compiled with compiled, and
`ratio_defaults` each library's default training path (candorlm compiles on CPU presets,
transformers' Trainer does not). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from candorlm.config import build_config, parse_set_args  # noqa: E402
from candorlm.device import autocast_dtype, configure_cpu_allocator, matmul_flops  # noqa: E402
from candorlm.model.transformer import Transformer  # noqa: E402


def hf_qwen3(mc):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.d_ff,
                      num_hidden_layers=mc.n_layers, num_attention_heads=mc.n_heads,
                      num_key_value_heads=mc.n_kv_heads, head_dim=mc.head_dim,
                      max_position_embeddings=mc.max_seq_len, rms_norm_eps=mc.norm_eps,
                      tie_word_embeddings=mc.tie_embeddings, attn_implementation="sdpa", use_cache=False)
    return Qwen3ForCausalLM(cfg)


def measure(step_fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]  # median: robust to a noisy neighbour


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", default=[],
                    help="override a preset setting, e.g. --set train.seq_len=512 (repeatable)")
    ap.add_argument("--no-compile", action="store_true", help="measure eager mode only")
    ap.add_argument("--ddp", action="store_true", help="also measure 2-process DDP scaling (bench/ddp_scaling.py)")
    args = ap.parse_args()
    # Process-wide, so both libraries get it: the ratio compares the models, not the allocator.
    configure_cpu_allocator()
    cfg = build_config(args.preset, parse_set_args(args.set))
    mc, tc = cfg.model, cfg.train
    B, T = args.batch_size or tc.batch_size, tc.seq_len
    amp = autocast_dtype("cpu", "auto")
    peak = matmul_flops("cpu", amp)
    torch.manual_seed(0)
    ours = Transformer(mc)
    flops_tok = ours.flops_per_token(T)
    x = torch.randint(0, mc.vocab_size, (B, T + 1))
    inp, tgt = x[:, :-1], x[:, 1:]

    def make_step(model, fwd, compiled=False):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        run = torch.compile(model) if compiled else model

        def step():
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = fwd(run)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    results = {}
    hf = hf_qwen3(mc)
    n_ours, n_hf = ours.num_params(), sum(p.numel() for p in hf.parameters())
    candidates = {
        "candorlm": make_step(ours, lambda m: m(inp, tgt)),
        "transformers": make_step(hf, lambda m: m(input_ids=inp, labels=x[:, :-1]).loss),
    }
    if not args.no_compile:
        candidates["candorlm_compiled"] = make_step(ours, lambda m: m(inp, tgt), compiled=True)
        candidates["transformers_compiled"] = make_step(hf, lambda m: m(input_ids=inp, labels=x[:, :-1]).loss,
                                                        compiled=True)
        for fn in list(candidates.values())[2:]:
            fn()  # compile outside the timed rounds
    # Interleave rounds so both see the same machine conditions.
    for _ in range(2):
        for name, fn in candidates.items():
            dt = measure(fn, max(1, args.steps // 2))
            results.setdefault(name, []).append(dt)
    out = {"preset": args.preset, "overrides": args.set, "batch": B, "seq_len": T, "dtype": "bf16" if amp else "fp32",
           "peak_matmul_gflops": round(peak / 1e9, 1), "params_candorlm": n_ours, "params_transformers": n_hf}
    print(f"shape: d_model={mc.d_model} layers={mc.n_layers} heads={mc.n_heads}/{mc.n_kv_heads} d_ff={mc.d_ff} "
          f"vocab={mc.vocab_size}; batch {B}x{T}; {out['dtype']}; measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"parameters: candorlm {n_ours / 1e6:.2f}M, transformers {n_hf / 1e6:.2f}M")
    print(f"{'model':<22}{'s/step':>10}{'tok/s':>12}{'MFU':>8}")
    for name, dts in results.items():
        dt = min(dts)
        tok_s = B * T / dt
        mfu = flops_tok * tok_s / peak
        out[f"{name}_tok_s"] = round(tok_s, 1)
        out[f"{name}_mfu"] = round(mfu, 4)
        print(f"{name:<22}{dt:>10.3f}{tok_s:>12,.0f}{100 * mfu:>7.1f}%")
    out["ratio"] = round(out["candorlm_tok_s"] / out["transformers_tok_s"], 3)
    print(f"candorlm / transformers, eager: {out['ratio']:.2f}x (target >= 1.5x); "
          f"candorlm MFU {100 * out['candorlm_mfu']:.0f}%")
    if not args.no_compile:
        out["ratio_compiled"] = round(out["candorlm_compiled_tok_s"] / out["transformers_compiled_tok_s"], 3)
        out["ratio_defaults"] = round(out["candorlm_compiled_tok_s"] / out["transformers_tok_s"], 3)
        print(f"candorlm / transformers, compiled: {out['ratio_compiled']:.2f}x; each default "
              f"(candorlm compiled, transformers eager): {out['ratio_defaults']:.2f}x; "
              f"candorlm compiled MFU {100 * out['candorlm_compiled_mfu']:.0f}% (target >= 50%)")
    if args.ddp:
        sys.path.insert(0, os.path.dirname(__file__))
        from ddp_scaling import ddp_scaling

        out["ddp"] = ddp_scaling()
        print(f"DDP on CPU: {json.dumps(out['ddp'])}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
