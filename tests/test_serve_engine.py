"""The serving engine against the single-sequence reference (generation.generate_ids): greedy and
seeded outputs alone and in batches, stop strings, n > 1, logprobs, the prefix cache,
cancellation, structured output, speculative decoding and refused settings."""

from __future__ import annotations

import json

import pytest
import torch

from candorlm.errors import CandorError
from candorlm.generation import generate_ids
from candorlm.serve.engine import Engine
from candorlm.serve.sampling import SamplingParams
from candorlm.train.loop import pretrain
from conftest import micro_config


@pytest.fixture(scope="module")
def lm(micro_tokens, micro_tokenizer, tmp_path_factory):
    import candorlm

    out = tmp_path_factory.mktemp("serve") / "m"
    pretrain(micro_tokens, micro_tokenizer, out, micro_config(("train.max_steps", "30"), ("train.eval_every", "0"),
                                                              ("model.max_seq_len", "128")), quiet=True)
    return candorlm.load(out)


def prompts(lm, count: int) -> list[list[int]]:
    """Prompts of different lengths cut from the tokenized text of a few Python lines."""
    text = "import os\ndef main(argv):\n    for item in argv:\n        print(item, len(item))\n" * 3
    ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(text)
    return [ids[: 2 + (7 * i) % 60] for i in range(count)]


def run(engine: Engine, handles) -> list[dict]:
    """Step the engine (no thread) until every handle has finished; each handle's events by sequence."""
    while not all(h.finished for h in handles):
        engine.step()
    out = []
    for h in handles:
        seqs: dict[int, dict] = {}
        for ev in h:
            s = seqs.setdefault(ev.index, {"ids": [], "text": "", "finish": [], "logprobs": [], "top": []})
            s["ids"].append(ev.token_id)
            s["text"] += ev.text
            s["finish"].append(ev.finish_reason)
            s["logprobs"].append(ev.logprob)
            s["top"].append(ev.top_logprobs)
        out.append(seqs)
    return out


def reference(lm, prompt, n, **settings) -> list[int]:
    """generate_ids' tokens, with the stop token it ended on (the engine reports that one too)."""
    settings = {"top_k": 0, "top_p": 1.0, **settings}
    ids = list(generate_ids(lm.model, prompt, n, stop_ids=set(), **settings))
    for i, t in enumerate(ids[:n]):
        if t in lm.stop_ids:
            return ids[:i + 1]
    return ids[:n]


def test_greedy_single_equals_generate(lm):
    engine = Engine(lm, max_slots=4)
    for p in prompts(lm, 3):
        [seqs] = run(engine, [engine.submit(p, SamplingParams(max_tokens=24, temperature=0))])
        ref = reference(lm, p, 24, temperature=0)
        assert seqs[0]["ids"] == ref and len(ref) > 3
        fin = seqs[0]["finish"]
        assert fin[:-1] == [None] * (len(fin) - 1) and fin[-1] in ("stop", "length")
        assert seqs[0]["text"] == lm.tokenizer.decode([t for t in ref if t not in lm.stop_ids], skip_special=True)


def test_sixteen_concurrent_greedy_requests_joining_at_different_times(lm):
    ps = prompts(lm, 16)
    # a small step budget forces chunked prefills beside running decodes
    engine = Engine(lm, max_slots=16, step_tokens=24)
    handles = [engine.submit(p, SamplingParams(max_tokens=10 + i, temperature=0)) for i, p in enumerate(ps[:6])]
    for _ in range(5):
        engine.step()
    handles += [engine.submit(p, SamplingParams(max_tokens=10 + i, temperature=0)) for i, p in enumerate(ps[6:], 6)]
    engine.step()
    assert engine.stats()["running"] > 0 and engine.stats()["waiting"] > 0
    out = run(engine, handles)
    for i, (p, seqs) in enumerate(zip(ps, out, strict=True)):
        assert seqs[0]["ids"] == reference(lm, p, 10 + i, temperature=0), f"request {i}"


def test_a_request_that_fails_while_sampling_fails_alone(lm):
    """An error in one request's sampling (here its sampler raises on the 3rd token) reaches that
    request's reader; the others in the batch finish with the output they have alone, and the
    engine serves the next request normally."""
    ps = prompts(lm, 4)
    engine = Engine(lm, max_slots=4)
    handles = [engine.submit(p, SamplingParams(max_tokens=8, temperature=0)) for p in ps]
    bad = engine._inbox[-1]
    sampler, calls = bad.seqs[0].sampler, []

    def observe(t, orig=sampler.observe):
        calls.append(t)
        if len(calls) == 3:
            raise RuntimeError("grammar rejected the token")
        orig(t)

    sampler.observe = observe
    while not all(h.finished for h in handles):
        engine.step()
    with pytest.raises(RuntimeError, match="grammar rejected"):
        list(handles[3])
    for p, h in zip(ps[:3], handles[:3], strict=True):
        assert [ev.token_id for ev in h] == reference(lm, p, 8, temperature=0)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    again = engine.submit(ps[3], SamplingParams(max_tokens=8, temperature=0))
    assert [ev.token_id for ev in run_events(engine, again)] == reference(lm, ps[3], 8, temperature=0)


def test_run_steps_in_the_calling_thread_until_stopped(lm):
    """Engine.run() serves from the thread that calls it (the server's engine thread, which
    loaded the model); stop() from another thread ends it, and the engine takes no more requests."""
    import threading

    ps = prompts(lm, 2)
    engine = Engine(lm, max_slots=2)
    t = threading.Thread(target=engine.run)
    t.start()
    h = engine.submit(ps[0], SamplingParams(max_tokens=8, temperature=0))
    assert [ev.token_id for ev in h] == reference(lm, ps[0], 8, temperature=0)
    engine.stop()
    t.join(timeout=10)
    assert not t.is_alive()
    with pytest.raises(CandorError, match="stopped"):
        engine.submit(ps[1], SamplingParams(max_tokens=8, temperature=0))


def run_events(engine: Engine, handle) -> list:
    while not handle.finished:
        engine.step()
    return list(handle)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(lm):
    ps = prompts(lm, 8)
    settings = dict(temperature=0.9, top_k=40, top_p=0.9)
    alone = []
    for i, p in enumerate(ps):
        engine = Engine(lm, max_slots=2)
        alone.append(run(engine, [engine.submit(p, SamplingParams(max_tokens=16, seed=100 + i, **settings))])[0])
    engine = Engine(lm, max_slots=8)
    batch = run(engine, [engine.submit(p, SamplingParams(max_tokens=16, seed=100 + i, **settings))
                         for i, p in enumerate(ps)])
    assert [s[0]["ids"] for s in batch] == [s[0]["ids"] for s in alone]
    # and the draw is generation.sample_next's: the reference gives the same tokens for the same seed
    assert alone[0][0]["ids"] == reference(lm, ps[0], 16, seed=100, **settings)
    assert len({tuple(s[0]["ids"]) for s in alone}) > 1


def test_stop_strings_are_cut_out(lm):
    p = prompts(lm, 3)[2]
    engine = Engine(lm)
    full = run(engine, [engine.submit(p, SamplingParams(max_tokens=30, temperature=0))])[0][0]
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    seqs = run(engine, [engine.submit(p, SamplingParams(max_tokens=30, temperature=0, stop=["@@never", stop]))])[0]
    assert seqs[0]["text"] == text[:text.index(stop)]
    assert seqs[0]["finish"][-1] == "stop" and len(seqs[0]["ids"]) < len(full["ids"])


def test_n_2_gives_two_seeded_sequences(lm):
    p = prompts(lm, 2)[1]
    engine = Engine(lm, max_slots=3)
    params = dict(max_tokens=12, temperature=1.0)
    [two] = run(engine, [engine.submit(p, SamplingParams(n=2, seed=7, **params))])
    [a] = run(engine, [engine.submit(p, SamplingParams(seed=7, **params))])
    [b] = run(engine, [engine.submit(p, SamplingParams(seed=8, **params))])
    assert sorted(two) == [0, 1]
    assert two[0]["ids"] == a[0]["ids"] and two[1]["ids"] == b[0]["ids"]
    assert two[0]["ids"] != two[1]["ids"]


def test_logprobs_match_a_direct_forward_pass(lm):
    p = prompts(lm, 2)[1]
    engine = Engine(lm)
    [seqs] = run(engine, [engine.submit(p, SamplingParams(max_tokens=6, temperature=0.8, seed=1, logprobs=True,
                                                          top_logprobs=20))])
    ids = seqs[0]["ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([p + ids]))[0, len(p) - 1:-1]
    ls = torch.log_softmax(logits, -1)
    for i, t in enumerate(ids):
        assert seqs[0]["logprobs"][i] == pytest.approx(float(ls[i, t]), abs=1e-4)
        top = seqs[0]["top"][i]
        assert [v for _, v in top] == pytest.approx(ls[i].topk(20).values.tolist(), abs=1e-4)
        assert top[0][0] == lm.tokenizer.id_to_bytes(int(ls[i].argmax())).decode("utf-8", errors="replace")


def test_prefix_cache_hit_gives_identical_output_and_counts(lm):
    system = prompts(lm, 9)[8]
    engine = Engine(lm, max_slots=2)
    first = run(engine, [engine.submit(system + [50, 60], SamplingParams(max_tokens=12, temperature=0))])[0]
    before = engine.stats()
    again = run(engine, [engine.submit(system + [50, 60], SamplingParams(max_tokens=12, temperature=0))])[0]
    other = run(engine, [engine.submit(system + [70], SamplingParams(max_tokens=12, temperature=0))])[0]
    after = engine.stats()
    assert again[0]["ids"] == first[0]["ids"]
    assert after["prefix_hits"] - before["prefix_hits"] == (len(system) + 1) + len(system)
    assert after["prefix_queries"] - before["prefix_queries"] == (len(system) + 2) + (len(system) + 1)
    cold = Engine(lm, max_slots=2, prefix_cache=False)
    assert run(cold, [cold.submit(system + [70], SamplingParams(max_tokens=12, temperature=0))])[0] == other
    assert cold.stats()["prefix_hits"] == 0


def test_cancel_frees_the_slot(lm):
    engine = Engine(lm, max_slots=1)
    engine.start()
    try:
        h = engine.submit(prompts(lm, 2)[1], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
        it = iter(h)
        next(it)
        h.cancel()
        rest = list(it)  # ends, without waiting for 100 tokens
        assert len(rest) < 99
        # the one slot is free again: a new request runs to the end
        h2 = engine.submit(prompts(lm, 2)[0], SamplingParams(max_tokens=5, temperature=0))
        assert [e.finish_reason for e in h2][-1] in ("stop", "length")
        assert engine.stats()["running"] == 0
    finally:
        engine.stop()


def test_json_schema_output_validates(lm):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    engine = Engine(lm, max_slots=2)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for seed in (0, 1):
        [seqs] = run(engine, [engine.submit(prompts(lm, 2)[1], SamplingParams(max_tokens=40, seed=seed,
                                                                             response_format=fmt))])
        assert seqs[0]["finish"][-1] == "stop"
        jsonschema.validate(json.loads(seqs[0]["text"]), schema)


def test_speculative_equals_plain_greedy(lm):
    ps = prompts(lm, 12)[4:]
    plain, spec = Engine(lm, max_slots=8), Engine(lm, max_slots=8, speculative=4)
    a = run(plain, [plain.submit(p, SamplingParams(max_tokens=30, temperature=0)) for p in ps])
    b = run(spec, [spec.submit(p, SamplingParams(max_tokens=30, temperature=0)) for p in ps])
    assert [s[0]["ids"] for s in a] == [s[0]["ids"] for s in b]
    assert spec.stats()["draft_accepted"] > 0 and spec.stats()["steps"] < plain.stats()["steps"]


@pytest.mark.parametrize("setting, words", [
    ({"temperature": -1.0}, "temperature=-1.0"), ({"top_p": 0.0}, "top_p=0.0"), ({"top_k": -1}, "top_k=-1"),
    ({"max_tokens": 0}, "max_tokens=0"), ({"top_logprobs": 21}, "top_logprobs=21"), ({"n": 0}, "n=0"),
    ({"min_p": 1.5}, "min_p=1.5"), ({"presence_penalty": 3.0}, "presence_penalty=3.0"),
    ({"stop": [""]}, "stop="), ({"seed": 2**64}, "seed="), ({"logit_bias": {3: 200.0}}, "logit_bias="),
    ({"response_format": {"type": "xml"}}, "response_format="), ({"temperature": float("nan")}, "temperature=nan"),
    ({"max_tokens": True}, "max_tokens=True"),
])
def test_bad_params_are_refused(lm, setting, words):
    engine = Engine(lm)
    with pytest.raises(CandorError, match=words.replace("(", r"\(").replace("[", r"\[")):
        engine.submit([0, 5, 6], SamplingParams(**setting))


def test_bad_prompts_are_refused(lm):
    engine = Engine(lm)
    with pytest.raises(CandorError, match="maximum context length is 128 tokens"):
        engine.submit([5] * 128, SamplingParams())
    with pytest.raises(CandorError, match="outside the vocabulary"):
        engine.submit([5, 100000], SamplingParams())
    with pytest.raises(CandorError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(CandorError, match="n=3"):
        Engine(lm, max_slots=2).submit([5], SamplingParams(n=3))


@pytest.mark.parametrize("variant", [(), (("model.pos_encoding", "alibi"),), (("model.pos_encoding", "learned"),),
                                     (("model.window_pattern", "SL"), ("model.window_size", "8")),
                                     (("model.qk_norm", "false"), ("model.mlp", "gelu"))])
def test_packed_segments_equal_separate_forwards(variant):
    """Decodes at different positions, a prefill chunk after a cached prefix and a whole prompt,
    in one packed pass, give each sequence's logits from Transformer.forward."""
    from candorlm.model.slots import Segment, SlotCache, SlotModel
    from candorlm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(micro_config(("model.vocab_size", "97"), *variant).model).eval()
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (9, 17, 30, 12)]
    cache = SlotCache(model.cfg, 4, 64)
    fwd = SlotModel(model)
    # fill the slots' caches: sequences 0 and 1 up to their last token, 2 up to position 20
    fwd(seqs[0][:-1], [Segment(0, 0, len(seqs[0]) - 1, "none")], cache)
    fwd(seqs[1][:-1], [Segment(1, 0, len(seqs[1]) - 1, "none")], cache)
    fwd(seqs[2][:20], [Segment(2, 0, 20, "none")], cache)
    segs = [Segment(0, len(seqs[0]) - 1, 1), Segment(1, len(seqs[1]) - 1, 1), Segment(2, 20, 10, "all"),
            Segment(3, 0, 12)]
    tokens = [seqs[0][-1], seqs[1][-1]] + seqs[2][20:] + seqs[3]
    got = fwd(tokens, segs, cache)
    with torch.no_grad():
        want = [model(torch.tensor([s]))[0] for s in seqs]
    expect = torch.cat([want[0][-1:], want[1][-1:], want[2][20:], want[3][-1:]])
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


def test_batched_decode_paths_agree():
    """Decodes in consecutive slots (attended through a view of the cache), in scattered slots
    (gathered) and with the packed oneDNN weights or without: each gives Transformer.forward's
    logits. A gather that picks the wrong slot, or a packed weight laid out wrongly, fails."""
    from candorlm.model.slots import Segment, SlotCache, SlotModel
    from candorlm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(micro_config(("model.vocab_size", "97")).model).eval()
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (9, 17, 30, 12)]
    cache = SlotCache(model.cfg, 4, 64)
    fwd = SlotModel(model)
    assert fwd.packed or not torch.backends.mkldnn.is_available()
    for slot, s in enumerate(seqs):
        fwd(s[:-1], [Segment(slot, 0, len(s) - 1, "none")], cache)
    with torch.no_grad():
        want = [model(torch.tensor([s]))[0, -1] for s in seqs]
    packed = fwd.packed
    for fwd.packed in (packed, {}):
        for order in ([0, 1, 2, 3], [1, 2], [3, 1, 0, 2], [0, 2]):
            got = fwd([seqs[i][-1] for i in order], [Segment(i, len(seqs[i]) - 1, 1) for i in order], cache)
            torch.testing.assert_close(got, torch.stack([want[i] for i in order]), atol=1e-4, rtol=1e-4)


def test_batch_argmax_equals_per_row_choice(lm, monkeypatch):
    """Greedy requests take their token from one argmax over the batch; with that fast path off
    (each row through the sampler) a mixed batch makes the same tokens."""
    from candorlm.serve.sampling import SequenceSampler

    ps = prompts(lm, 6)
    settings = [dict(temperature=0), dict(temperature=0, repetition_penalty=1.3), dict(temperature=0.8, seed=3),
                dict(temperature=0), dict(temperature=0, logit_bias={5: 3.0}), dict(temperature=0)]

    def batch():
        engine = Engine(lm, max_slots=6, step_tokens=16)
        return run(engine, [engine.submit(p, SamplingParams(max_tokens=12, **kw)) for p, kw in zip(ps, settings,
                                                                                                    strict=True)])

    fast = batch()
    monkeypatch.setattr(SequenceSampler, "plain_greedy", property(lambda self: False))
    assert batch() == fast
    assert fast[0][0]["ids"] == reference(lm, ps[0], 12, temperature=0)


def test_bfloat16_weights_stay_close_to_float32(lm):
    from candorlm.model.slots import Segment, SlotCache, SlotModel

    p = prompts(lm, 5)[4]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        fwd = SlotModel(lm.model, dtype)
        out[dtype] = fwd(p, [Segment(0, 0, len(p), "all")], SlotCache(lm.model.cfg, 1, 128, dtype=fwd.dtype))
    assert lm.model.embed.weight.dtype == torch.float32  # the model itself is left as it was
    probs = {k: torch.softmax(v, -1) for k, v in out.items()}
    assert (probs[torch.float32] - probs[torch.bfloat16]).abs().max() < 0.02
    engine = Engine(lm, dtype="bfloat16")
    [seqs] = run(engine, [engine.submit(p, SamplingParams(max_tokens=8, temperature=0))])
    assert len(seqs[0]["ids"]) >= 1


def test_threaded_engine_serves_concurrent_async_readers(lm):
    import asyncio

    ps = prompts(lm, 16)
    engine = Engine(lm, max_slots=16, step_tokens=64)
    engine.start()

    async def one(i, p):
        await asyncio.sleep(0.002 * i)  # arrivals spread over the first steps
        h = engine.submit(p, SamplingParams(max_tokens=8 + i % 5, temperature=0))
        return [ev.token_id async for ev in h.events()]

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))

    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == [reference(lm, p, 8 + i % 5, temperature=0) for i, p in enumerate(ps)]
    stats = engine.stats()
    assert stats["running"] == 0 and stats["generation_tokens_total"] == sum(map(len, got))
    assert stats["prompt_tokens_total"] == sum(map(len, ps))


@pytest.mark.slow
def test_compiled_lone_decode_equals_eager(lm):
    """The compiled one-token step (attention over the whole slot under a mask) decodes what the
    eager path decodes, also after the slot held a longer earlier sequence."""
    eager, compiled = Engine(lm, max_slots=1), Engine(lm, max_slots=1, compile=True)
    for p in prompts(lm, 9)[6:]:
        a = run(eager, [eager.submit(p, SamplingParams(max_tokens=20, temperature=0))])
        b = run(compiled, [compiled.submit(p, SamplingParams(max_tokens=20, temperature=0))])
        assert a[0][0]["ids"] == b[0][0]["ids"]


def test_logit_bias_penalties_and_min_p(lm):
    p = prompts(lm, 4)[3]
    engine = Engine(lm, max_slots=2)

    def ids(**settings):
        return run(engine, [engine.submit(p, SamplingParams(max_tokens=12, **settings))])[0][0]["ids"]

    greedy = ids(temperature=0)
    assert ids(temperature=0, logit_bias={77: 100.0}) == [77] * 12  # the bias wins every step
    assert ids(temperature=1.0, min_p=1.0, seed=3) == greedy  # only the most likely token is left
    assert ids(temperature=0, repetition_penalty=1.3) == reference(lm, p, 12, temperature=0, repetition_penalty=1.3)
    # OpenAI's penalties, recomputed by hand: logits - frequency * count - presence * (count > 0)
    seq, counts = list(p), torch.zeros(lm.model.cfg.vocab_size)
    for _ in range(12):
        with torch.no_grad():
            logits = lm.model(torch.tensor([seq]))[0, -1]
        t = int((logits - 0.7 * counts - 0.5 * (counts > 0)).argmax())
        seq.append(t)
        counts[t] += 1
    assert ids(temperature=0, frequency_penalty=0.7, presence_penalty=0.5, ignore_eos=True) == seq[len(p):]
    assert ids(temperature=0, frequency_penalty=0.7, ignore_eos=True) != seq[len(p):]  # each penalty counts
    assert ids(temperature=0, ignore_eos=True) != seq[len(p):]


class _Bytes:
    """A tokenizer stand-in whose token i is table[i]."""

    def __init__(self, table):
        self.table = table

    def id_to_bytes(self, i):
        return self.table[i]


def test_text_stream_holds_back_split_characters_and_stop_prefixes():
    from candorlm.serve.text import TextStream

    table = {10: "é".encode()[:1], 11: "é".encode()[1:], 12: b"ab", 13: b"c#", 14: b"#d", 15: b"x"}
    s = TextStream(_Bytes(table), stop=["##"])
    assert s.push(10) == ("", False)  # half a character
    assert s.push(11) == ("é", False)
    assert s.push(13) == ("c", False)  # '#' may start "##"
    assert s.push(14) == ("", True)  # the stop string spans two tokens and is cut out
    s = TextStream(_Bytes(table), stop=["##"])
    assert [s.push(t) for t in (13, 15)] == [("c", False), ("#x", False)]
    assert s.push(13) == ("c", False) and s.flush() == "#"
    assert TextStream(_Bytes(table)).push(0) == ("", False)  # special tokens stand for no text
