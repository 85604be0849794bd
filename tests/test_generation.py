"""Generation: greedy KV-cached decode equals full recomputation; sampling options behave."""

import pytest
import torch

from candorlm.generation import generate_ids, sample_next
from conftest import train_micro


@pytest.fixture(scope="module")
def micro_model(micro_tokens, micro_tokenizer, tmp_path_factory):
    return train_micro(micro_tokens, micro_tokenizer, tmp_path_factory.mktemp("gen") / "m", 20)


def test_greedy_cached_decode_equals_recompute(micro_model):
    from candorlm.model.io import load_model

    m = load_model(micro_model)
    for prompt in ([0, 5, 9, 200], [0], list(range(1, 40))):
        a = list(generate_ids(m, prompt, 30, temperature=0, use_cache=True))
        b = list(generate_ids(m, prompt, 30, temperature=0, use_cache=False))
        assert a == b and len(a) > 0


def test_api_generate(micro_model):
    import candorlm

    m = candorlm.load(micro_model)
    text = m.generate("def ", max_new_tokens=16, temperature=0)
    assert isinstance(text, str) and not text.startswith("def ")
    assert text == m.generate("def ", max_new_tokens=16, temperature=0)
    s1 = m.generate("import ", max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.95, seed=3)
    s2 = m.generate("import ", max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.95, seed=3)
    assert s1 == s2


@pytest.mark.parametrize("setting, words", [
    ({"temperature": -0.5}, "temperature=-0.5"), ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"), ({"top_k": -1}, "top_k=-1"),
    ({"max_new_tokens": -3}, "max_new_tokens=-3"), ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
])
def test_bad_sampling_settings_are_refused(micro_model, setting, words):
    import candorlm
    from candorlm.errors import CandorError

    m = candorlm.load(micro_model)
    args = {"max_new_tokens": 4, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0, **setting}
    with pytest.raises(CandorError, match=words.replace("(", r"\(")):
        m.generate("def ", **args)
    # the edges of each range are accepted
    m.generate("def ", max_new_tokens=0, temperature=0, top_k=0, top_p=1.0)
    m.generate("def ", max_new_tokens=2, temperature=2.0, top_k=1, top_p=1e-3, seed=0)


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample_next(logits, 1.0, 2, 1.0, g)) for _ in range(300)}
    assert seen_k == {0, 1}
    probs = torch.softmax(logits, -1)[0]
    # top_p just above p0 keeps tokens 0 and 1 (the first token's mass < top_p)
    p = float(probs[0]) + 0.01
    seen_p = {int(sample_next(logits, 1.0, 0, p, g)) for _ in range(300)}
    assert seen_p == {0, 1}
    assert {int(sample_next(logits, 0.0, 0, 1.0, g)) for _ in range(5)} == {0}


def test_repetition_penalty():
    from candorlm.generation import penalize_repeats

    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    seen = torch.tensor([True, True, False, False])
    assert torch.equal(penalize_repeats(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 1.5, 0.5]]))
    assert torch.equal(penalize_repeats(logits, seen, 1.0), logits)
    assert int(sample_next(penalize_repeats(logits, seen, 2.0), 0.0, 0, 1.0, None)) == 2  # was 0


def test_repetition_penalty_in_decoding(micro_model, tmp_path):
    import json
    import shutil

    import candorlm
    from candorlm.generation import penalize_repeats
    from candorlm.model.io import load_model

    m = load_model(micro_model)
    prompt = [0, 5, 9, 200, 5, 9]
    plain = list(generate_ids(m, prompt, 30, temperature=0))
    assert list(generate_ids(m, prompt, 30, temperature=0, repetition_penalty=1.0)) == plain
    # the reference: recompute, penalize every token of the context so far, take the argmax
    ids, ref = list(prompt), []
    with torch.no_grad():
        for _ in range(30):
            seen = torch.zeros(m.cfg.vocab_size, dtype=torch.bool)
            seen[ids] = True
            ref.append(int(penalize_repeats(m(torch.tensor([ids]))[:, -1], seen, 3.0).argmax()))
            ids.append(ref[-1])
    got = list(generate_ids(m, prompt, 30, temperature=0, repetition_penalty=3.0))
    assert got == ref and got != plain
    api = candorlm.load(micro_model)
    penalized = api.generate("def ", max_new_tokens=12, temperature=0, repetition_penalty=3.0)
    assert penalized != api.generate("def ", max_new_tokens=12, temperature=0)
    # left unset, it is the model directory's generation_config.json that decides
    shutil.copytree(micro_model, tmp_path / "m")
    gpath = tmp_path / "m" / "generation_config.json"
    assert json.loads(gpath.read_text())["repetition_penalty"] == 1.0
    gpath.write_text(json.dumps({**json.loads(gpath.read_text()), "repetition_penalty": 3.0}))
    assert candorlm.load(tmp_path / "m").generate("def ", max_new_tokens=12, temperature=0) == penalized


def test_generation_goes_past_the_context_by_shifting(micro_model):
    from candorlm.model.io import load_model

    m = load_model(micro_model)
    ctx = m.cfg.max_seq_len
    for prompt in ([0, 5, 9], list(range(1, 3 * ctx))):  # short, and longer than the context
        a = list(generate_ids(m, prompt, 3 * ctx, temperature=0, use_cache=True))
        b = list(generate_ids(m, prompt, 3 * ctx, temperature=0, use_cache=False))
        assert a == b and len(a) == 3 * ctx
        # a prompt longer than the context keeps its end: only its last ctx tokens matter
        assert list(generate_ids(m, prompt[-ctx:], 3 * ctx, temperature=0)) == a
    # after a shift the model sees the last half of the tokens from position 0: the token after
    # the shift is the one a fresh decode of that half gives
    prompt = list(range(1, ctx + 1))
    a = list(generate_ids(m, prompt, 2, temperature=0))
    half = (prompt + a[:1])[-(ctx // 2):]
    assert a[1] == next(generate_ids(m, half, 1, temperature=0))


def test_token_healing_regenerates_the_last_prompt_token(micro_model):
    import candorlm

    m = candorlm.load(micro_model)
    prompt = "def f(x):\n    return "
    ids = [m.tokenizer.bos_id] + m.tokenizer.encode(prompt)
    base, allowed, tail = m._healing(ids)
    assert base == ids[:-1] and tail == m.tokenizer.id_to_bytes(ids[-1]) and tail
    picked = allowed.nonzero().flatten().tolist()
    special = set(m.tokenizer.special_ids.values())
    scan = [i for i in range(m.tokenizer.vocab_size)
            if i not in special and m.tokenizer.id_to_bytes(i).startswith(tail)]
    assert ids[-1] in picked and picked == scan
    for prefix in (b"", b" ", b"de", b"\xff", b"zzzzzzzz"):  # the bisection agrees with a scan everywhere
        assert sorted(m.tokenizer.ids_starting_with(prefix)) == [
            i for i in range(m.tokenizer.vocab_size)
            if i not in special and m.tokenizer.id_to_bytes(i).startswith(prefix)]
    out = list(generate_ids(m.model, base, 8, temperature=0, first_allowed=allowed, stop_ids=m.stop_ids))
    raw = b"".join(m.tokenizer.id_to_bytes(i) for i in out)
    assert raw.startswith(tail)
    assert m.generate(prompt, max_new_tokens=8, temperature=0) == raw[len(tail):].decode("utf-8", errors="replace")
    # without healing, the prompt's tokens are kept as they are
    plain = list(generate_ids(m.model, ids, 8, temperature=0, stop_ids=m.stop_ids))
    text = b"".join(m.tokenizer.id_to_bytes(i) for i in plain).decode("utf-8", errors="replace")
    assert m.generate(prompt, max_new_tokens=8, temperature=0, heal=False) == text


def test_damaged_model_directories_are_clear_errors(micro_model, tmp_path):
    import json
    import shutil

    import candorlm
    from candorlm.errors import CandorError

    bad = tmp_path / "bad"
    shutil.copytree(micro_model, bad)
    weights = (micro_model / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:1000])  # truncated
    with pytest.raises(CandorError, match="not a readable safetensors file"):
        candorlm.load(bad)
    (bad / "model.safetensors").write_bytes(weights)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["d_ff"] += 64  # a shape the weights do not have
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CandorError, match="does not match config.json.*size mismatch"):
        candorlm.load(bad)
    (bad / "config.json").write_text("{")
    with pytest.raises(CandorError, match="not a valid candorlm config.json"):
        candorlm.load(bad)
    with pytest.raises(CandorError, match="not a torch device"):
        candorlm.load(micro_model, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CandorError, match="CUDA is not available"):
            candorlm.load(micro_model, device="cuda")


def test_sampling_defaults_come_from_one_place(micro_model, tmp_path):
    """generation_config.json is written from GenerationConfig; a setting given explicitly wins
    over the file, which wins over GenerationConfig's defaults (also for a directory without one)."""
    import dataclasses
    import json
    import shutil

    import candorlm
    from candorlm.config import GenerationConfig

    gpath = micro_model / "generation_config.json"
    assert json.loads(gpath.read_text()) == dataclasses.asdict(GenerationConfig())
    assert candorlm.load(micro_model).generation_config == GenerationConfig()
    d = tmp_path / "m"
    shutil.copytree(micro_model, d)
    (d / "generation_config.json").unlink()
    assert candorlm.load(d).generation_config == GenerationConfig()
    # top_k=1 in the file makes sampling greedy whatever the seed; an explicit top_k=0 does not
    (d / "generation_config.json").write_text(json.dumps({"top_k": 1, "temperature": 1.5, "max_new_tokens": 10}))
    m = candorlm.load(d)
    greedy = m.generate("def ", temperature=0)
    assert greedy == m.generate("def ", temperature=0, max_new_tokens=10)
    assert all(m.generate("def ", seed=s) == greedy for s in range(3))
    assert any(m.generate("def ", seed=s, top_k=0) != greedy for s in range(5))
    (d / "generation_config.json").write_text(json.dumps({"top_p": 2.0}))
    from candorlm.errors import CandorError

    with pytest.raises(CandorError, match="generation_config.json: generation.top_p=2.0 must be in"):
        candorlm.load(d)
