"""Throughput of `candor serve` under concurrent streaming clients: aggregate generated tokens/s
and time to first token at 1, 4 and 16 concurrent streams (target: 16 streams >= 6x the
aggregate of 1), through the real HTTP server and the official wire format.

    python bench/serve.py [--model DIR] [--tokens 128] [--rounds 2] [--streams 1,4,16]

Without --model, the cpu-tiny-shaped random model of bench/decode.py. The server runs as a
subprocess (`candor serve --port 0 --max-slots 16`); the clients are asyncio streams in this
process, each a different prompt, greedy, `ignore_eos` so each makes exactly --tokens tokens.
Aggregate tokens/s: all streams' completion tokens (from the usage chunk) over the wall time
from the first request sent to the last stream's end; TTFT: from a request sent to its first
chunk with text, as a client sees it (mean and worst over the streams; a random model's first
tokens are often half a character, sent with the next), and the server's own
candor:time_to_first_token_seconds (arrival to first token, vLLM's definition), from /metrics.
Best round by aggregate. The same requests go straight into an in-process Engine first
(`engine_direct`), so `server_vs_engine` is what HTTP, JSON and the event loop cost. Last, the
time from a client closing its stream mid-answer to /metrics showing its slot free. Clients and
server share the machine's cores, as they would on a laptop. Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def start_server(model_dir: Path, run_dir: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    proc = subprocess.Popen([sys.executable, "-m", "candorlm", "serve", "--model", str(model_dir), "--port", "0",
                             "--max-slots", "16", "--run-dir", str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=env)
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"candor serve did not start: {line}")
    url = line.split("listening on ")[1].split()[0]
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("candor serve did not load its model in 120 s")


async def one_stream(client, url: str, i: int, tokens: int, t0: float) -> tuple[float, int]:
    """(seconds from t0 to the first content chunk, completion tokens)."""
    body = {"messages": [{"role": "user", "content": f"Request {i}: write a function that adds {i} and {i + 1}."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    first, used = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            # substring tests, not a JSON parse per token: the clients share the server's cores
            if not line.startswith("data: "):
                continue
            if first is None and '"role"' not in line and '"choices": []' not in line:
                first = time.perf_counter() - t0
            if '"choices": []' in line:
                used = json.loads(line[6:])["usage"]["completion_tokens"]
    return first, used


async def server_ttft(client, url: str) -> tuple[float, float]:
    """(sum, count) of the server's candor:time_to_first_token_seconds histogram."""
    text = (await client.get(f"{url}/metrics")).text
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("candor:time_to_first_token_seconds_")}
    return values["candor:time_to_first_token_seconds_sum"], values["candor:time_to_first_token_seconds_count"]


async def measure(url: str, streams: int, tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_stream(client, url, -1, 1, time.perf_counter())  # the client's first-request costs out of the figures
        s0, c0 = await server_ttft(client, url)
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one_stream(client, url, i, tokens, t0) for i in range(streams)))
        wall = time.perf_counter() - t0
        s1, c1 = await server_ttft(client, url)
    ttft = [g[0] for g in got]
    total = sum(g[1] for g in got)
    return {"streams": streams, "tokens": total, "seconds": round(wall, 3), "tok_s": round(total / wall, 1),
            "ttft_mean_s": round(sum(ttft) / len(ttft), 4), "ttft_max_s": round(max(ttft), 4),
            "server_ttft_mean_s": round((s1 - s0) / (c1 - c0), 4)}


def _read(handle, t0: float, got: list) -> None:
    """Read one engine request to its end: append (seconds to its first token, tokens)."""
    first, n = None, 0
    for _ev in handle:
        first = first if first is not None else time.perf_counter() - t0
        n += 1
    got.append((first, n))


def engine_direct(model_dir: Path, counts: list[int], tokens: int, rounds: int) -> dict[int, dict]:
    """The same requests straight into an Engine in this process (no HTTP): what the server's
    figures are to be compared with. Best round by aggregate."""
    import threading

    import candorlm
    from candorlm.serve.engine import Engine
    from candorlm.serve.sampling import SamplingParams

    lm = candorlm.load(model_dir)
    engine = Engine(lm, max_slots=16)
    best: dict[int, dict] = {}

    def drive():
        try:
            for _ in range(rounds):
                for n in counts:
                    prompts = [lm.tokenizer.render_chat([{"role": "user", "content": f"Request {i}: write a function "
                                                          f"that adds {i} and {i + 1}."}], add_generation_prompt=True)
                               for i in range(n)]
                    t0 = time.perf_counter()
                    handles = [engine.submit(p, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
                               for p in prompts]
                    got: list[tuple[float, int]] = []
                    threads = [threading.Thread(target=_read, args=(h, t0, got)) for h in handles]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    wall = time.perf_counter() - t0
                    made = sum(g[1] for g in got)
                    r = {"streams": n, "tokens": made, "tok_s": round(made / wall, 1),
                         "ttft_mean_s": round(sum(g[0] for g in got) / n, 4)}
                    if n not in best or r["tok_s"] > best[n]["tok_s"]:
                        best[n] = r
        finally:
            engine.stop()

    # The engine steps in this thread, which loaded the model (one OpenMP team, as in the server:
    # Engine.run); the requests are sent and read from threads that run no PyTorch work.
    driver = threading.Thread(target=drive)
    driver.start()
    engine.run()
    driver.join()
    return best


async def disconnect_seconds(url: str) -> float:
    """Seconds from closing a streaming request's connection, mid-answer, until /metrics shows no
    request running (the slot is free again)."""
    import httpx

    body = {"messages": [{"role": "user", "content": "A long answer."}], "max_tokens": 100_000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and '"role"' not in line:
                    break  # answering: leave mid-stream, closing the connection
        t0 = time.perf_counter()
        while True:
            text = (await client.get(f"{url}/metrics")).text
            running = [line for line in text.splitlines() if line.startswith("candor:num_requests_running")]
            if running and float(running[0].split()[-1]) == 0:
                return round(time.perf_counter() - t0, 4)
            await asyncio.sleep(0.005)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model directory (default: bench/decode.py's random cpu-tiny-shaped one)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", default="1,4,16")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from decode import make_model

            model = make_model(tmp)
        direct = engine_direct(model, counts, args.tokens, args.rounds)
        print(json.dumps({"engine_direct": [direct[n] for n in counts]}), flush=True)
        proc, url = start_server(model, tmp / "run")
        try:
            asyncio.run(measure(url, 2, 8))  # warm-up: first-call costs out of the figures
            best: dict[int, dict] = {}
            for _ in range(args.rounds):
                for n in counts:
                    r = asyncio.run(measure(url, n, args.tokens))
                    print(json.dumps(r), flush=True)
                    if n not in best or r["tok_s"] > best[n]["tok_s"]:
                        best[n] = r
            freed = asyncio.run(disconnect_seconds(url))
        finally:
            proc.terminate()
            proc.wait(30)
    out = {"bench": "serve", "tokens_per_stream": args.tokens, "results": [best[n] for n in counts],
           "engine_direct": [direct[n] for n in counts],
           "server_vs_engine": [round(best[n]["tok_s"] / direct[n]["tok_s"], 2) for n in counts],
           "disconnect_to_free_slot_s": freed, "cpu_threads": os.cpu_count()}
    if 1 in best and max(counts) > 1:
        out[f"aggregate_{max(counts)}_vs_1"] = round(best[max(counts)]["tok_s"] / best[1]["tok_s"], 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
