"""The transformer: KV-cache decode equals full recomputation for every positional encoding
and window pattern; the fused loss and the CPU attention kernel equal the plain ones;
options build and train."""

import pytest
import torch

from candorlm.config import ModelConfig
from candorlm.model.attention import KVCache
from candorlm.model.kernels import head_loss as loss_mod
from candorlm.model.kernels.cpu_attention import causal_attention
from candorlm.model.kernels.head_loss import fused_head_loss, naive_head_loss
from candorlm.model.transformer import Transformer

POS = ["rope", "alibi", "learned", "sinusoidal", "none"]


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, window_size=4)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("pattern", ["", "SSL", "SL"])
def test_kv_cache_decode_equals_recompute(pos, pattern):
    torch.manual_seed(0)
    m = Transformer(tiny(pos_encoding=pos, window_pattern=pattern)).eval()
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = m(idx)
        cache = KVCache(m.cfg, 2, 32)
        parts = [m(idx[:, :9], cache=cache, start=0), m(idx[:, 9:13], cache=cache, start=9)]
        parts += [m(idx[:, t:t + 1], cache=cache, start=t) for t in range(13, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    m = Transformer(tiny(window_pattern="S", n_layers=1, window_size=4)).eval()
    # With one sliding layer (the last layer is always full, so use 2 layers where the first
    # slides), check the windowed layer directly: changing a token outside the window of the
    # last position changes nothing in a fully windowed model.
    m2 = Transformer(tiny(window_pattern="SL", n_layers=2, window_size=4))
    assert m2.windows == [4, 0]
    m.windows = [4]
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 2] = (a[0, 2] + 1) % 97
    with torch.no_grad():
        la, lb = m(a), m(b)
    torch.testing.assert_close(la[0, -1], lb[0, -1])
    assert not torch.allclose(la[0, 3], lb[0, 3])


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_fused_head_loss_matches_naive(softcap):
    torch.manual_seed(0)
    x = torch.randn(700, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (700,))
    t[::7] = -1
    for red in ("mean", "none", "sum"):
        a = fused_head_loss(x, w, t, softcap, red)
        b = naive_head_loss(x, w, t, softcap, red)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # per-token losses without gradients: the chunked path (evaluation)
            torch.testing.assert_close(fused_head_loss(x, w, t, softcap, red), b.detach(), atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(fused_head_loss(x, w, t, softcap).sum(), (x, w))
    gb = torch.autograd.grad(naive_head_loss(x, w, t, softcap).sum(), (x, w))
    for u, v in zip(ga, gb, strict=False):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_fused_head_loss_across_chunks_and_partial_grads(softcap, monkeypatch):
    """Several chunks (the summed path computes its gradients in forward, per-token losses
    are computed chunk by chunk), gradients for x only and for w only, bf16 autocast, and a
    forward without gradients."""
    monkeypatch.setattr(loss_mod, "SUM_CHUNK_ROWS", 96)
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", 64 * 50)  # 64 rows of the 50-token vocabulary
    torch.manual_seed(1)
    x = torch.randn(333, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (333,))
    t[5::11] = -1
    for red in ("mean", "sum"):
        ga = torch.autograd.grad(fused_head_loss(x, w, t, softcap, red), (x, w))
        gb = torch.autograd.grad(naive_head_loss(x, w, t, softcap, red), (x, w))
        for u, v in zip(ga, gb, strict=False):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
    # Per-token losses weighted unevenly, with gradients: the plain path.
    wts = torch.rand(333)
    ga = torch.autograd.grad((fused_head_loss(x, w, t, softcap, "none") * wts).sum(), (x, w))
    gb = torch.autograd.grad((naive_head_loss(x, w, t, softcap, "none") * wts).sum(), (x, w))
    for u, v in zip(ga, gb, strict=False):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # without: chunk by chunk (6 chunks of 64 rows), ignored rows 0
        per_token = fused_head_loss(x, w, t, softcap, "none")
        torch.testing.assert_close(per_token, naive_head_loss(x, w, t, softcap, "none"))
        assert (per_token[5::11] == 0).all()
    (gx,) = torch.autograd.grad(fused_head_loss(x, w.detach(), t, softcap), (x,))
    torch.testing.assert_close(gx, torch.autograd.grad(naive_head_loss(x, w.detach(), t, softcap), (x,))[0],
                               atol=1e-5, rtol=1e-4)
    (gw,) = torch.autograd.grad(fused_head_loss(x.detach(), w, t, softcap), (w,))
    torch.testing.assert_close(gw, torch.autograd.grad(naive_head_loss(x.detach(), w, t, softcap), (w,))[0],
                               atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused_head_loss(x, w, t, softcap), naive_head_loss(x, w, t, softcap))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fused_head_loss(x, w, t, softcap)
        b = naive_head_loss(x.bfloat16(), w.bfloat16(), t, softcap)
    torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("masking", ["causal", "window", "alibi", "alibi+window"])
@pytest.mark.parametrize("block_rows", [4, 64])
def test_cpu_attention_kernel_matches_sdpa(monkeypatch, heads, masking, block_rows):
    """The CPU training attention (batched matmuls, grouped heads stacked on rows) against
    SDPA with the same mask: float64 values, and gradients by finite differences (gradcheck);
    13 positions in blocks of 4, 4 and 5 (each block scoring only the keys up to its end) and
    in one block."""
    from candorlm.model.attention import build_mask
    from candorlm.model.kernels import cpu_attention
    from candorlm.model.positions import alibi_slopes

    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", block_rows)
    assert len(cpu_attention._blocks(13)) == (3 if block_rows == 4 else 1)

    H, KV = heads
    torch.manual_seed(0)
    # q as the model makes it: a transposed view of (B, T, H, D).
    q = torch.randn(2, 13, H, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, KV, 13, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, KV, 13, 8, dtype=torch.float64, requires_grad=True)
    window = 4 if "window" in masking else 0
    slopes = alibi_slopes(H) if "alibi" in masking else None
    mask = build_mask(13, 0, window, slopes, "cpu", torch.float64)
    assert (mask is None) == (masking == "causal")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                           enable_gqa=KV != H)
    torch.testing.assert_close(causal_attention(q, k, v, mask), ref)
    assert torch.autograd.gradcheck(lambda q, k, v: causal_attention(q, k, v, mask), (q, k, v))


def test_cpu_attention_kernel_compiles_for_dynamic_lengths(monkeypatch):
    """Compiled with a symbolic sequence length (as torch.compile does after seeing several
    lengths, and as a profile of earlier runs can make it from the start), the kernel takes
    one block (its split is Python control flow on T) and gives the eager kernel's values and
    gradients. Dynamo's own backend: the failure this guards against is in tracing, and
    inductor's code generation for it takes minutes here."""
    from candorlm.model.kernels import cpu_attention

    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", 4)
    f = torch.compile(lambda q, k, v: causal_attention(q, k, v), backend="eager", fullgraph=True)
    T = 13
    q = torch.randn(2, T, 4, 8).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 2, T, 8, requires_grad=True) for _ in range(2))
    for x in (q, k, v):
        torch._dynamo.mark_dynamic(x, 2)
    go = torch.randn(2, 4, T, 8)
    got = torch.autograd.grad(f(q, k, v), (q, k, v), go)
    want = torch.autograd.grad(causal_attention(q, k, v), (q, k, v), go)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_bf16_grouped_query_attention_in_one_block_has_finite_gradients():
    """Inductor under bf16 autocast, grouped-query heads (2 key heads), a sequence short enough
    for one query block: the gradients are finite and close to eager's. With k and v passed
    to the kernel as strided views, inductor saved v^T for backward through a kernel that
    GCC 12 at -O2/-O3 miscompiled on an Intel Xeon (Sapphire Rapids; two bf16 32x32
    transposes in one parallel region): every gradient was NaN from the first step. The
    kernel now takes k and v contiguous, which leaves bmm nothing to transpose. Tiny enough
    to run where bf16 is emulated too."""
    eager, compiled = twin(ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                       max_seq_len=64))
    compiled.compile()
    cfg = eager.cfg
    x = torch.randint(0, cfg.vocab_size, (8, 65), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x[:, :-1], x[:, 1:]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[1].items():
        assert torch.isfinite(g).all(), f"compiled gradient of {n} is not finite"
        torch.testing.assert_close(g, grads[0][n], atol=2e-2, rtol=5e-2)


def twin(cfg: ModelConfig, **changes) -> tuple[Transformer, Transformer]:
    """Two models with the same weights, the second built with `changes` to its config."""
    import dataclasses

    torch.manual_seed(0)
    a = Transformer(cfg)
    b = Transformer(dataclasses.replace(cfg, **changes))
    b.load_state_dict(a.state_dict())
    return a, b


def loss_and_grads(m: Transformer, x: torch.Tensor):
    m.zero_grad()
    loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("kw", [{}, {"pos_encoding": "alibi"}, {"window_pattern": "SL"},
                                {"pos_encoding": "alibi", "window_pattern": "SL"}])
def test_training_step_same_through_cpu_kernel_and_sdpa(monkeypatch, kw):
    """A model's loss and gradients are the same with model.attention_backend=cpu (the
    batched-matmul kernel) and sdpa (float32), with each kind of mask: causal, ALiBi biases,
    sliding windows; and the cpu backend does send every training layer to the kernel."""
    from candorlm.model.kernels import cpu_attention

    calls = []
    kernel = cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a: calls.append(1) or kernel(*a))
    cpu, sdpa = twin(tiny(n_layers=2, **kw), attention_backend="sdpa")
    assert (cpu.attention_backend, sdpa.attention_backend) == ("cpu", "sdpa")  # auto on CPU: the kernel
    x = torch.randint(0, 97, (3, 40))
    la, ga = loss_and_grads(cpu, x)
    assert len(calls) == 2  # every layer took the kernel, masked or not
    lb, gb = loss_and_grads(sdpa, x)
    assert len(calls) == 2
    torch.testing.assert_close(la, lb)
    for u, v in zip(ga, gb, strict=False):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


def test_cpu_backend_keeps_sdpa_where_the_kernel_does_not_pay(monkeypatch):
    """Inference (no gradients), decoding with a KV cache (start > 0, or one query) and
    probabilities over the memory cap take SDPA; training within the cap takes the kernel."""
    from candorlm.model import attention as A
    from candorlm.model.kernels import cpu_attention

    def plan(batch=3, q_len=39, start=0):
        return A.plan_attention("cpu", batch, 4, q_len, start, 0, None, "cpu", torch.float32)[0]

    assert plan() is cpu_attention.causal_attention
    with torch.no_grad():
        assert plan() is A.sdpa_attention
    assert plan(start=5) is A.sdpa_attention and plan(q_len=1) is A.sdpa_attention
    monkeypatch.setattr(cpu_attention, "MAX_PROB_BYTES", 3 * 4 * 39 * 39 * 4 - 1)
    assert plan() is A.sdpa_attention  # over the cap: SDPA's O(T) memory
    assert plan(batch=2) is cpu_attention.causal_attention
    assert A.plan_attention("sdpa", 3, 4, 39, 0, 0, None, "cpu", torch.float32)[0] is A.sdpa_attention


def test_attention_backend_is_resolved_for_the_device():
    """auto: the kernel on CPU, FlexAttention for sliding windows on CUDA (resolved without a
    GPU: only the choice is made here), SDPA elsewhere; an explicit choice stays; a bad one is
    a config error naming the accepted values."""
    from candorlm.errors import CandorError
    from candorlm.model.attention import resolve_backend

    assert [resolve_backend("auto", d) for d in ("cpu", "cuda", "meta")] == ["cpu", "flex", "sdpa"]
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    m = Transformer(tiny(), device="cuda")  # parameters stay where they are made (CPU here)
    assert m.attention_backend == "flex" and not m.embed.index_add_backward
    m.use_device("cpu")
    assert m.attention_backend == "cpu" and m.embed.index_add_backward
    with pytest.raises(CandorError, match="attention_backend='fast' is not one of auto, sdpa, cpu, flex"):
        tiny(attention_backend="fast").resolved()


def test_unfused_qk_norm_rope_path_trains_the_same():
    """The plain QK-norm then RoPE (the path tensor parallelism switches the model to) gives
    the fused function's loss and gradients."""
    fused, plain = twin(tiny(n_layers=2))
    for block in plain.layers:
        block.attn.fused_qk_norm_rope = False
    x = torch.randint(0, 97, (3, 40))
    la, ga = loss_and_grads(fused, x)
    lb, gb = loss_and_grads(plain, x)
    torch.testing.assert_close(la, lb)
    for u, v in zip(ga, gb, strict=False):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


def test_fused_qk_norm_rope_matches_norm_then_rope():
    """The fused per-head RMSNorm + RoPE against rms_norm then apply_rope: float64 values and
    gradients (gradcheck, including the norm weight), and bf16 within bf16's resolution."""
    from candorlm.model.kernels.qk_norm_rope import _QKNormRope
    from candorlm.model.positions import apply_rope, rope_tables

    torch.manual_seed(0)
    cos, sin = rope_tables(8, 13)
    x = torch.randn(2, 13, 3, 8, dtype=torch.float64, requires_grad=True)  # (B, T, heads, D)
    w = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()

    def fused(x, w):
        return _QKNormRope.apply(x, w, cos[:, None].double(), sin[:, None].double(), 1e-6)

    def reference(x, w):
        n = torch.nn.functional.rms_norm(x.transpose(1, 2), (8,), w, 1e-6)
        return apply_rope(n, cos.double(), sin.double()).transpose(1, 2)

    torch.testing.assert_close(fused(x, w), reference(x, w))
    assert torch.autograd.gradcheck(fused, (x, w))
    xb = x.detach().bfloat16()
    torch.testing.assert_close(_QKNormRope.apply(xb, w.detach().bfloat16(), cos[:, None], sin[:, None], 1e-6).float(),
                               reference(x, w).detach().float(), atol=2e-2, rtol=2e-2)


def test_embedding_gradient_equals_nn_embedding():
    """The CPU embedding's index_add_ backward sums repeated tokens like nn.Embedding's."""
    from candorlm.model.transformer import Embedding

    torch.manual_seed(0)
    ours, ref = Embedding(11, 5), torch.nn.Embedding(11, 5)
    ours.index_add_backward = True
    ref.weight.data.copy_(ours.weight.data)
    idx = torch.tensor([[1, 3, 3, 0], [3, 10, 1, 1]])
    g = torch.randn(2, 4, 5)
    ours(idx).backward(g)
    ref(idx).backward(g)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_compiled_training_step_equals_eager():
    """Under torch.compile the head loss, the QK-norm/RoPE and the embedding take their
    compile-only forms (model/kernels/): the loss and every gradient match eager float32
    (this is the path CPU presets train on)."""
    torch.manual_seed(0)
    m = Transformer(tiny(n_layers=2, logit_softcap=30.0))
    x = torch.randint(0, 97, (3, 41))
    x[0, 5] = -1  # an ignored target

    def grads(model):
        m.zero_grad()
        loss = model(x[:, :-1].clamp(min=0), x[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    le, ge = grads(m)
    torch._dynamo.reset()
    lc, gc = grads(torch.compile(m))
    torch.testing.assert_close(lc, le, atol=1e-5, rtol=1e-5)
    for a, b in zip(gc, ge, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(pos_encoding=p) for p in POS] + [
                                dict(window_pattern="SSSL", n_layers=4),
                                dict(window_pattern="SL", pos_encoding="alibi"),
                                dict(mlp="relu2"), dict(mlp="gelu", norm="layernorm", qk_norm=False),
                                dict(n_kv_heads=1), dict(n_kv_heads=4), dict(tie_embeddings=False),
                                dict(logit_softcap=30.0), dict(pos_encoding="learned", mlp="gelu")])
def test_options_train(kw):
    torch.manual_seed(0)
    m = Transformer(tiny(**kw))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 32))
    losses = []
    for _ in range(15):
        loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    g = Transformer(tiny(n_kv_heads=2)).eval()
    h = Transformer(tiny(n_kv_heads=4)).eval()
    sd = g.state_dict()
    hd = g.cfg.head_dim
    for i in range(g.cfg.n_layers):
        for name in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.attn.{name}.weight"].view(2, hd, -1)
            sd[f"layers.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    h.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(g(x), h(x), atol=1e-5, rtol=1e-4)


def test_bad_config_is_a_clear_error():
    from candorlm.errors import CandorError

    with pytest.raises(CandorError, match="multiple of"):
        tiny(n_kv_heads=3).resolved()
    with pytest.raises(CandorError, match="pos_encoding"):
        tiny(pos_encoding="xpos").resolved()


@pytest.mark.parametrize("pattern", ["SL", "SSSL"])
def test_flex_attention_sliding_windows_equal_sdpa_masks(pattern):
    """The GPU path (model.attention_backend=flex: FlexAttention block masks) computes what
    SDPA with a boolean mask does; FlexAttention runs forward-only on CPU, enough to compare."""
    cfg = tiny(window_pattern=pattern, n_layers=4, window_size=5, max_seq_len=128, attention_backend="sdpa")
    sdpa, flex = twin(cfg, attention_backend="flex")
    x = torch.randint(0, 97, (2, 128))
    with torch.no_grad():
        torch.testing.assert_close(flex.eval()(x), sdpa.eval()(x), atol=2e-5, rtol=1e-4)
