"""Compressed models against the float ones and against llama.cpp, in one run: size on disk, batch-1
greedy decode speed and validation bits-per-byte for fp32, bf16, int8, int4 (groups of 32 and
128), 50% magnitude, 50% Wanda and 2:4 Wanda pruning (each with and without a recovery
fine-tune), and llama.cpp (llama-cpp-python) at f32 and q8_0 on the model's GGUF export.

    python bench/compress.py [--model runs/demo/base --tokens runs/demo/tokens] [--threads 1]
        [--new-tokens 128] [--rounds 3] [--recover-steps 100] [--eval-tokens N] [--work DIR]
    python bench/compress.py --model DIR --tokens DIR --shape 768,12   # a random model of that
        shape (d_model, layers) and the model's tokenizer: size and speed only, no bpb
    python bench/compress.py --kernels     # one linear layer's kernels at batch 1, per shape (also
        what runs when there is no model directory, as under `make bench` before `make demo`)

Decode: the same prompt, 128 new tokens (greedy, never stopping early), prefill included, best
of 3 rounds, the variants interleaved within each round. bpb: the windows of the run's own
evaluation (train.seq_len, train.eval_tokens), which Wanda's calibration avoids, in the
precision `candor eval` uses (bf16 autocast where native). Checks the targets (int8: bpb
+<= 1%, >= 3.5x smaller than fp32, faster than fp32; int4 g32: bpb +<= 5%; Wanda 50% loses
less than magnitude 50%) and prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from candorlm.compress.prune import prune_model, report_windows  # noqa: E402
from candorlm.compress.quantize import quantize_model  # noqa: E402
from candorlm.config import ModelConfig  # noqa: E402
from candorlm.data.shards import open_split  # noqa: E402
from candorlm.device import (  # noqa: E402
    autocast_dtype,
    configure_cpu_allocator,
    native_bf16,  # noqa: E402
)
from candorlm.evaluate.bpb import evaluate_bpb, token_bytes_for  # noqa: E402
from candorlm.generation import generate_ids  # noqa: E402
from candorlm.model.io import load_model, read_model_config, weights_state_dict, write_model_files  # noqa: E402
from candorlm.model.kernels.quantized import choose_kernel  # noqa: E402
from candorlm.model.transformer import Transformer  # noqa: E402
from candorlm.tokenizer import Tokenizer  # noqa: E402

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
QUANTIZED = {"int8": ("int8", None), "int4-g32": ("int4", 32), "int4-g128": ("int4", 128)}
PRUNED = {"magnitude-50%": ("magnitude", 0.5, None), "wanda-50%": ("wanda", 0.5, None),
          "wanda-2:4": ("wanda", None, "2:4")}


def build(args, work: Path, speed_only: bool) -> dict[str, dict]:
    """Every candorlm variant as {"dir": model directory, "bf16": bool}; the GGUF files."""
    base = Path(args.model)
    out = {"fp32": {"dir": base}, "bf16": {"dir": base, "bf16": True}}
    for name, (method, group) in QUANTIZED.items():
        out[name] = {"dir": quantize_model(base, work / name, method, group)}
    if not speed_only:
        for name, (method, sparsity, pattern) in PRUNED.items():
            for steps in (0, args.recover_steps):
                key = name + (f" +{steps} steps" if steps else "")
                t0 = time.perf_counter()
                rec = prune_model(base, work / key.replace(" ", "_"), method, sparsity, pattern, args.tokens,
                                  eval_tokens=args.eval_tokens, recover_steps=steps)
                out[key] = {"dir": work / key.replace(" ", "_"), "sparsity": rec["achieved_overall"],
                            "prune_s": time.perf_counter() - t0}
    return out


def size_bytes(v: dict, work: Path) -> int:
    if v.get("bf16"):  # what a bf16 model.safetensors holds
        from safetensors.torch import save_file

        model = load_model(v["dir"])
        path = work / "bf16.safetensors"
        save_file({k: t.bfloat16() for k, t in weights_state_dict(model).items()}, str(path))
        return path.stat().st_size
    return (Path(v["dir"]) / "model.safetensors").stat().st_size


def load(v: dict):
    model = load_model(v["dir"])
    return model.to(torch.bfloat16) if v.get("bf16") else model


def decode_s(model, ids: list[int], n: int) -> float:
    t0 = time.perf_counter()
    got = sum(1 for _ in generate_ids(model, ids, n, temperature=0))
    assert got == n
    return time.perf_counter() - t0


def llama_models(args, work: Path, threads: int, n_ctx: int) -> dict:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows")
        return {}
    from candorlm.export.gguf import export_gguf

    out = {}
    for kind in ("f32", "q8_0"):
        path = export_gguf(args.model, work / f"model-{kind}.gguf", kind)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_batch=n_ctx, verbose=False, seed=0)
        out[f"llama.cpp {kind}"] = {"llm": llm, "size": path.stat().st_size}
    return out


def llama_decode_s(llm, ids: list[int], n: int) -> float:
    t0 = time.perf_counter()
    llm.reset()
    got = 0
    for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got += 1
        if got == n:
            break
    return time.perf_counter() - t0


def random_model(args, work: Path) -> Path:
    d, layers = (int(v) for v in args.shape.split(","))
    tok = Tokenizer.load(args.model)
    heads = d // 64  # the presets' 64-dim heads and kv heads: 4/2 (cpu-tiny), 6/2, 12/4 (gpt2-small)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=d, n_layers=layers, n_heads=heads,
                      n_kv_heads=max(2, heads // 3), max_seq_len=read_model_config(args.model).max_seq_len)
    torch.manual_seed(0)
    out = work / f"random-{d}x{layers}"
    write_model_files(out, Transformer(cfg), args.model)
    return out


def kernel_table(threads: int) -> list[dict]:
    """One linear layer at batch 1: fp32 and bf16 F.linear, the int8 and int4 packed kernels
    (bf16 and fp32 activations), dequantize-in-every-call; microseconds, best of 7 rounds."""
    from candorlm.model.kernels.quantized import Int4Linear, Int8Linear
    from candorlm.model.quant import quantize_int4, quantize_int8

    torch.set_num_threads(threads)

    def us(f, n=200):
        for _ in range(20):
            f()
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best = min(best, (time.perf_counter() - t0) / n)
        return round(best * 1e6, 1)

    def shape_row(out_f: int, in_f: int) -> dict:
        w = torch.randn(out_f, in_f) * 0.02
        x, xb, wb = torch.randn(1, in_f), torch.randn(1, in_f).bfloat16(), w.bfloat16()
        q, s = quantize_int8(w)
        sb = s.bfloat16()
        i8 = Int8Linear(q, s, "packed")
        i4 = {g: Int4Linear(*quantize_int4(w, g), in_f, g, "packed") for g in (32, 128)}
        return {
            "shape": f"{out_f}x{in_f}", "fp32": us(lambda: F.linear(x, w)), "bf16": us(lambda: F.linear(xb, wb)),
            "int8 packed": us(lambda: i8(x)),
            "int8 fp32 act": us(lambda: torch.ops.aten._weight_int8pack_mm(x, q, s), n=20),
            "int8 dequant/call": us(lambda: F.linear(x, q.float()) * s, n=50),
            "int8 bare bf16": us(lambda: torch.ops.aten._weight_int8pack_mm(xb, q, sb)),
            "int4 g32 packed": us(lambda: i4[32](x)), "int4 g128 packed": us(lambda: i4[128](x)),
        }

    shapes = [(256, 256), (704, 256), (256, 704), (8192, 256), (768, 768), (2048, 768), (768, 2048)]
    rows = [shape_row(o, i) for o, i in shapes]
    return rows


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/base")
    ap.add_argument("--tokens", default="runs/demo/tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and llama.cpp threads (default 1: batch-1 decode here is per-op overhead)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=None, help="default: the run's train.eval_tokens")
    ap.add_argument("--shape", default=None, help="D,L: a random model of d_model D and L layers (speed only)")
    ap.add_argument("--work", default=None, help="where the variants are written (default: a temporary directory)")
    ap.add_argument("--kernels", action="store_true", help="only the per-layer kernel table")
    args = ap.parse_args()
    configure_cpu_allocator()
    cpu = "native bf16" if native_bf16() else "no native bf16 (fp32 kernels)"
    if not args.kernels and not (Path(args.model) / "config.json").is_file():
        print(f"no model directory at {args.model} (`make demo` makes runs/demo/base; or pass --model and --tokens): "
              "the kernel table only")
        args.kernels = True
    if args.kernels:
        rows = kernel_table(args.threads)
        print(f"one linear layer, batch 1, {args.threads} thread(s), {cpu}; microseconds")
        print_table(rows, list(rows[0]))
        print(json.dumps({"bench": "compress-kernels", "threads": args.threads, "rows": rows}))
        return
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="candor-compress-"))
    speed_only = args.shape is not None
    if speed_only:
        args.model = str(random_model(args, work))
    t0 = time.perf_counter()
    variants = build(args, work, speed_only)
    build_s = time.perf_counter() - t0
    cfg = read_model_config(args.model)
    ids = [Tokenizer.load(args.model).bos_id] + Tokenizer.load(args.model).encode(PROMPT)
    llamas = llama_models(args, work, args.threads, cfg.max_seq_len)

    rows = {name: {"size_mb": size_bytes(v, work) / 1e6, **{k: v[k] for k in ("sparsity",) if k in v}}
            for name, v in variants.items()}
    rows.update({name: {"size_mb": v["size"] / 1e6} for name, v in llamas.items()})
    models = {name: load(v) for name, v in variants.items()}
    best = {name: float("inf") for name in rows}
    for _ in range(args.rounds):  # interleaved, so a neighbour's burst slows every variant alike
        for name, model in models.items():
            best[name] = min(best[name], decode_s(model, ids, args.new_tokens))
        for name, v in llamas.items():
            best[name] = min(best[name], llama_decode_s(v["llm"], ids, args.new_tokens))
    for name in rows:
        rows[name]["tok_s"] = args.new_tokens / best[name]

    if not speed_only:
        seq_len, budget = report_windows(args.model, cfg.max_seq_len, args.eval_tokens)
        val, tb = open_split(args.tokens, "val"), token_bytes_for(args.model, args.tokens)
        amp = autocast_dtype("cpu", "auto")
        for name, model in models.items():
            rows[name]["bpb"] = evaluate_bpb(model, val, tb, seq_len, budget, 8, amp)["val_bpb"]

    fp = rows["fp32"]
    for r in rows.values():
        r["x_smaller"] = fp["size_mb"] / r["size_mb"]
        r["x_fp32_speed"] = r["tok_s"] / fp["tok_s"]
        if "bpb" in r:
            r["bpb_change_pct"] = 100 * (r["bpb"] / fp["bpb"] - 1)
        for ll in llamas:
            r[f"{ll} / this"] = rows[ll]["tok_s"] / r["tok_s"]

    table = []
    for name, r in rows.items():
        line = {"variant": name, "MB": f"{r['size_mb']:.2f}", "x smaller": f"{r['x_smaller']:.2f}",
                "tok/s": f"{r['tok_s']:.0f}", "x fp32": f"{r['x_fp32_speed']:.2f}"}
        if "bpb" in r:
            line.update({"bpb": f"{r['bpb']:.4f}", "bpb change": f"{r['bpb_change_pct']:+.2f}%"})
        for ll in llamas:
            line[f"{ll} x"] = f"{r[f'{ll} / this']:.2f}"
        table.append(line)
    kernel = choose_kernel("cpu")
    print(f"\n{args.model}: d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}; decode "
          f"{args.new_tokens} tokens at batch 1, best of {args.rounds}, {args.threads} thread(s); {cpu}, "
          f"quantized kernel: {kernel}; variants built in {build_s:.0f} s")
    print_table(table, list(table[0]) if speed_only else list(max(table, key=len)))

    targets = {"int8 is >= 3.5x smaller than fp32": rows["int8"]["x_smaller"] >= 3.5,
               "int8 decodes faster than fp32": rows["int8"]["tok_s"] > fp["tok_s"]}
    if not speed_only:
        targets.update({
            "int8 raises bpb by <= 1%": rows["int8"]["bpb_change_pct"] <= 1.0,
            "int4 g32 raises bpb by <= 5%": rows["int4-g32"]["bpb_change_pct"] <= 5.0,
            "wanda 50% loses less than magnitude 50%": rows["wanda-50%"]["bpb"] < rows["magnitude-50%"]["bpb"],
        })
    for what, ok in targets.items():
        note = " (the dequantized kernel is fp32's matmul: no faster by design)" if (
            "faster" in what and kernel == "dequantized") else ""
        print(f"{'PASS' if ok else 'FAIL'}  {what}{note}")
    print(json.dumps({"bench": "compress", "model": str(args.model), "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                      "threads": args.threads, "new_tokens": args.new_tokens, "kernel": kernel,
                      "native_bf16": native_bf16(), "rows": rows, "targets": targets}))


if __name__ == "__main__":
    main()
