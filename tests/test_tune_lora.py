"""LoRA through peft: only the adapters train, they save alone in peft's format and load back,
and a merged model directory computes the adapted model's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from candorlm.errors import CandorError
from candorlm.model.io import load_model
from candorlm.model.transformer import Transformer
from candorlm.tune.lora import (
    LORA_TARGETS,
    apply_lora,
    load_adapter,
    merged_model,
    parameter_counts,
    save_adapter,
    save_merged,
)
from conftest import micro_config


def micro_model(*extra) -> Transformer:
    torch.manual_seed(0)
    return Transformer(micro_config(*extra).model)


def randomize_adapters(peft_model, seed=1):
    """LoRA starts with B = 0 (adapted == base); give B values so that merging has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_only_adapters_train_and_they_are_a_small_share():
    m = apply_lora(micro_model())
    trainable, total = parameter_counts(m)
    assert 0 < trainable < 0.05 * total
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == set(LORA_TARGETS)  # every projection of the default MLP
    base = m.get_base_model()
    assert base.lm_head.weight is base.embed.weight  # the tie survives wrapping
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 300, (2, 16))
    for _ in range(2):
        m(x, x).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)


def test_cpu_tiny_share_and_other_mlps():
    from candorlm.config import build_config

    tiny = Transformer(build_config("cpu-tiny").model)
    trainable, total = parameter_counts(apply_lora(tiny))
    assert trainable / total < 0.03
    gelu = apply_lora(micro_model(("model.mlp", "gelu")))
    assert not any("gate_proj" in n for n, _ in gelu.named_parameters())


def test_bad_targets_and_settings():
    with pytest.raises(CandorError, match="tied to the embedding"):
        apply_lora(micro_model(), targets=("q_proj", "lm_head"))
    with pytest.raises(CandorError, match="match none"):
        apply_lora(micro_model(), targets=("w_q",))
    with pytest.raises(CandorError, match="rank"):
        apply_lora(micro_model(), rank=0)


def test_adapters_save_alone_and_load_back(tmp_path):
    m = apply_lora(micro_model(), rank=4)
    randomize_adapters(m)
    x = torch.randint(0, 300, (2, 16))
    m.eval()
    with torch.no_grad():
        want = m(x)
    save_adapter(m, tmp_path / "adapter", base_model="runs/demo/base")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "model.safetensors" not in files
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(LORA_TARGETS)
    assert cfg["base_model_name_or_path"] == "runs/demo/base"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)  # no base weights
    again = load_adapter(micro_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want)
    with pytest.raises(CandorError, match="no LoRA adapter"):
        load_adapter(micro_model(), tmp_path)


def test_merged_model_directory_gives_the_adapted_logits(tmp_path, micro_tokenizer):
    base = micro_model()
    plain = copy.deepcopy(base).eval()
    m = apply_lora(base, rank=8, dropout=0.1)
    randomize_adapters(m)
    m.eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        adapted, original = m(x), plain(x)
    assert (adapted - original).abs().max() > 1e-2  # the adapters do change the model
    out = save_merged(m, tmp_path / "chat", micro_tokenizer, generation={"temperature": 0.7})
    loaded = load_model(out)
    assert loaded.lm_head.weight is loaded.embed.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), adapted, rtol=1e-4, atol=1e-5)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "generation_config.json"}
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
    # the wrapped model is untouched by the merge: it still adapts, and merges again the same
    with torch.no_grad():
        torch.testing.assert_close(m(x), adapted)
        torch.testing.assert_close(merged_model(m)(x), adapted, rtol=1e-4, atol=1e-5)


def test_disabled_adapters_are_the_base_model():
    base = micro_model()
    plain = copy.deepcopy(base).eval()
    m = apply_lora(base)
    randomize_adapters(m)
    m.eval()
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad(), m.disable_adapter():
        torch.testing.assert_close(m(x), plain(x))
