"""Batch-1 greedy decode speed of candorlm's serving engine against `transformers`' generate (the
same weights in Qwen3ForCausalLM, export/hf.py) and llama.cpp (llama-cpp-python, f32 and q8_0
GGUF from export/gguf.py), measured in one run on this machine.

    python bench/decode.py [--model DIR] [--tokens 200] [--rounds 3] [--threads 2] [--only engine,hf,...]

Without --model, a cpu-tiny-shaped model (d 256, 4 layers, 4/2 heads, vocab 8192) with random
weights and a tokenizer trained on a few standard-library modules is made in a temp dir: speed
does not depend on what the weights say, and greedy decoding ignores the end token here, so
every peer decodes exactly --tokens tokens. Decode rate: (tokens - 1) / (time of the last token -
time of the first), so prefill is left out; the best of --rounds, peers interleaved. Every peer
runs float32 on --threads threads but the `_bf16` engines (bfloat16 weights and KV cache) and
llama_q8_0; `_compiled` engines run the lone decode step through torch.compile (its ~30-40 s
of compiling fall in the warm-up round). The engines step in this process's main thread, the
one that loaded every model (as `candor serve` steps its engine in the thread that loaded it:
serve/engine.py `Engine.run`): a second thread running PyTorch work would slow every peer here,
llama.cpp's OpenMP threads too. bench/serve.py measures through the HTTP server. Last line: JSON,
with each peer's tokens/s and each engine variant's ratio to each peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "heapq.py", "shlex.py", "string.py", "glob.py",
           "queue.py", "sched.py", "graphlib.py", "abc.py", "copy.py", "struct.py", "weakref.py", "argparse.py",
           "dataclasses.py", "enum.py", "functools.py", "inspect.py", "pathlib.py", "typing.py", "tarfile.py"]


def make_model(d: Path) -> Path:
    """A cpu-tiny-shaped model directory with random weights (seed 0)."""
    from candorlm.config import build_config
    from candorlm.model.io import write_model_files
    from candorlm.model.transformer import Transformer
    from candorlm.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / m).read_text(encoding="utf-8") for m in MODULES if (stdlib / m).is_file()]
    tok_dir = d / "tok"
    tok = train_tokenizer(texts, vocab_size=8192)
    tok.save(tok_dir)
    cfg = build_config("cpu-tiny", [("model.vocab_size", str(tok.vocab_size))]).model
    torch.manual_seed(0)
    out = d / "model"
    write_model_files(out, Transformer(cfg), tok_dir)
    return out


def engine_peer(model_dir: Path, n: int, dtype: str | None = None, compile: bool = False):
    import candorlm
    from candorlm.serve.engine import Engine
    from candorlm.serve.sampling import SamplingParams

    lm = candorlm.load(model_dir)
    ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(PROMPT)
    engine = Engine(lm, max_slots=1, dtype=dtype, compile=compile)
    engine.warm()

    def run():
        # stepped here, in the thread that loaded the model and runs the peers: one OpenMP team
        # (Engine.run says what a second one costs); one stamp per step that made a token
        h = engine.submit(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        stamps: list[float] = []
        while not h.finished:
            engine.step()
            if h.completion_tokens > len(stamps):
                stamps.append(time.perf_counter())
        list(h)
        return stamps

    return run, lambda: None


def hf_peer(model_dir: Path, n: int, tmp: Path):
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from candorlm.export.hf import export_hf

    hf_dir = export_hf(model_dir, tmp / "hf")
    model = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([[0] + tok(PROMPT)["input_ids"]])

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call is the prompt
                self.t.append(time.perf_counter())

        def end(self):
            pass

    def run():
        s = Stamps()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=s,
                           pad_token_id=5, eos_token_id=None)
        return s.t

    return run, lambda: None


def llama_peer(model_dir: Path, n: int, tmp: Path, kind: str, threads: int):
    import llama_cpp

    from candorlm.export.gguf import export_gguf
    from candorlm.tokenizer import Tokenizer

    path = export_gguf(model_dir, tmp / f"model-{kind}.gguf", kind)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, n_batch=256,
                          verbose=False, seed=0)
    tok = Tokenizer.load(model_dir)
    ids = [tok.bos_id] + tok.encode(PROMPT)

    def run():
        llm.reset()
        stamps = []
        for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return stamps

    return run, llm.close


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model directory (default: a random cpu-tiny-shaped one)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="engine,engine_compiled,engine_bf16,engine_bf16_compiled,hf,llama_f32,llama_q8_0")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from candorlm.device import configure_cpu_allocator

    configure_cpu_allocator()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        model_dir = Path(args.model) if args.model else make_model(tmp)
        wanted = args.only.split(",")
        builders = {"engine": lambda: engine_peer(model_dir, args.tokens),
                    "engine_compiled": lambda: engine_peer(model_dir, args.tokens, compile=True),
                    "engine_bf16": lambda: engine_peer(model_dir, args.tokens, "bfloat16"),
                    "engine_bf16_compiled": lambda: engine_peer(model_dir, args.tokens, "bfloat16", True),
                    "hf": lambda: hf_peer(model_dir, args.tokens, tmp),
                    "llama_f32": lambda: llama_peer(model_dir, args.tokens, tmp, "f32", args.threads),
                    "llama_q8_0": lambda: llama_peer(model_dir, args.tokens, tmp, "q8_0", args.threads)}
        peers, closers = {}, []
        for name in wanted:
            try:
                peers[name], close = builders[name]()
                closers.append(close)
            except ImportError as e:
                print(f"{name}: skipped ({e})", file=sys.stderr)
        rates: dict[str, float] = {name: 0.0 for name in peers}
        for run in peers.values():
            run()  # warm up: first-call allocations, lazy initialisation
        for _ in range(args.rounds):
            for name, run in peers.items():
                t = run()
                assert len(t) == args.tokens, f"{name} decoded {len(t)} tokens, not {args.tokens}"
                rates[name] = max(rates[name], (len(t) - 1) / (t[-1] - t[0]))
        for close in closers:
            close()
    from candorlm.device import cpu_has_bf16, cpu_name

    cpu = f"{cpu_name()} (native bf16: {'yes' if cpu_has_bf16() else 'no'})"
    print(f"batch-1 greedy decode, {args.tokens} tokens, {args.threads} threads, {cpu}")
    engines = [k for k in rates if k.startswith("engine")]
    peers_ = [k for k in rates if not k.startswith("engine")]
    ratios = {e: {p: round(rates[e] / rates[p], 2) for p in peers_} for e in engines}
    for name, r in rates.items():
        shown = "  ".join(f"{p} {x:.2f}x" for p, x in ratios.get(name, {}).items())
        print(f"  {name:22s} {r:8.1f} tok/s  {shown}")
    result = {"bench": "decode", "tokens": args.tokens, "threads": args.threads, "cpu": cpu,
              "tok_s": {k: round(v, 1) for k, v in rates.items()}, "ratios": ratios}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
