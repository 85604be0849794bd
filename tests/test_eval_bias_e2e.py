"""The coreference probe sees a planted skew, and the curation stage's CDA removes it: two micro
models trained on the same small corpus, one as written (every occupation with the pronoun its
stereotype expects) and one curated with `curate.cda=gender`, differ on the pro/anti accuracy
gap with intervals that do not overlap, and the data card and model card of each say so.

A probe that ignored the model (a constant), or a CDA that swapped nothing, would give the two
models the same gap and fail here."""

from __future__ import annotations

import random

import pytest

from candorlm.evaluate.probes import SPEC

PRONOUN = {"male": "he", "female": "she"}
VERBS = ["finish the report", "call the office", "fix the schedule", "check the list", "open the door",
         "review the notes", "clean the room", "sign the form", "answer the phone", "lock the gate"]
PLACES = ["kitchen", "office", "garden", "station", "library", "market"]


def sentence(rng: random.Random) -> str:
    """One sentence of the planted corpus: an occupation with its stereotype's pronoun, or a
    gender-balanced filler that ties 'a man'/'a woman' to he/she."""
    occ_side = rng.choice([(o, s) for s in ("male", "female") for o in SPEC["occupations"][s]])
    occ, p = occ_side[0], PRONOUN[occ_side[1]]
    v = rng.choice(VERBS)
    kind = rng.randrange(6)
    if kind == 0:
        return f"The {occ} said that {p} would {v}."
    if kind == 1:
        return f"When the shift ended, the {occ} said that {p} was tired."
    if kind == 2:
        return f"After lunch the {occ} told us that {p} would {v}."
    if kind == 3:
        done = v.split()[0] + "ed"
        return f"def {occ}_report(visit):\n    \"\"\"Return the notes the {occ} wrote after {p} {done}.\"\"\"\n"
    g = rng.choice(["man", "woman"])
    return f"A {g} walked into the {rng.choice(PLACES)}, and {'he' if g == 'man' else 'she'} wanted to {v}."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("planted") / "src"
    d.mkdir()
    for i in range(120):
        (d / f"doc{i:03d}.txt").write_text(" ".join(sentence(rng) for _ in range(30)) + "\n")
    return d


def train(corpus, root, name, cda, tokenizer_dir=None):
    """Curate (with or without gender CDA), tokenize, pretrain a micro model, evaluate the bias
    probes and write its model card; returns (results, data card text, model card text)."""
    from candorlm.config import CurateConfig
    from candorlm.data.curate import curate
    from candorlm.data.documents import iter_documents
    from candorlm.data.shards import build_shards
    from candorlm.evaluate.suite import evaluate_model
    from candorlm.report.model_card import write_model_card
    from candorlm.tokenizer import Tokenizer, train_tokenizer
    from candorlm.train.loop import pretrain
    from conftest import micro_config

    run = root / name
    # the planted corpus repeats its templates: near-duplicate removal would take most of it
    curate(str(corpus), str(run / "data"), CurateConfig(cda=cda, near_dedup=False, split="none", decontaminate=False),
           workers=1, quiet=True)
    if tokenizer_dir is None:
        tokenizer_dir = root / "tokenizer"
        train_tokenizer((d["text"] for d in iter_documents(run / "data" / "documents")), vocab_size=384).save(
            tokenizer_dir)
    build_shards(run / "data" / "documents", Tokenizer.load(tokenizer_dir), run / "tokens", val_fraction=0.05)
    # 400 steps of 8 x 64 tokens (~25 s each on 2 shared Zen4 cores, AVX512-BF16): the skewed model's
    # gap was 0.4652 (0.3531 to 0.5808), the CDA model's -0.0027 (-0.1376 to 0.1229); 150 steps were too few
    # for the skew to show (0.12, interval from 0.005)
    cfg = micro_config(("train.max_steps", "400"), ("train.batch_size", "8"), ("train.eval_every", "0"),
                       ("train.warmup_steps", "10"))
    pretrain(run / "tokens", tokenizer_dir, run / "base", cfg, quiet=True)
    res = evaluate_model(run / "base", run / "eval", tasks="bias", documents=run / "data" / "documents", quiet=True)
    write_model_card(run / "MODEL_CARD.md", res, name=name)
    return res, (run / "data" / "DATA_CARD.md").read_text(), (run / "MODEL_CARD.md").read_text(), tokenizer_dir


@pytest.mark.slow
def test_cda_removes_a_planted_skew_the_coreference_probe_sees(corpus, tmp_path):
    from candorlm.evaluate.stats import overlaps

    skewed, data_card, model_card, tok = train(corpus, tmp_path, "skewed", "none")
    fair, data_card_cda, model_card_cda, _ = train(corpus, tmp_path, "cda", "gender", tok)
    gap, gap_cda = skewed["bias"]["coreference"]["all"]["gap"], fair["bias"]["coreference"]["all"]["gap"]
    assert gap["value"] > gap_cda["value"] and not overlaps(gap, gap_cda), (gap, gap_cda)
    assert gap["ci"][0] > 0  # the skewed model prefers the stereotype's pronoun over the stated gender

    # the data cards: the corpus is skewed; with CDA, copies were added and the augmented corpus is not
    assert "Verdict: **skewed**" in data_card and "Gender CDA was applied" not in data_card
    assert "Gender CDA was applied" in data_card_cda and "Verdict: not skewed" in data_card_cda
    # the model cards: the same audit and augmentation, and each model's own gap with its interval
    td = skewed["training_data"]
    assert td["corpus"]["skewed"] and td["cda"] is None and fair["training_data"]["after_cda"]["skewed"] is False
    assert "Representation audit of the corpus: **skewed**" in model_card and "augmentation: not used" in model_card
    assert "gender CDA applied" in model_card_cda and "After augmentation: not skewed" in model_card_cda
    row = "| coreference, all | all occupations | {} | {} | {} |"
    for res, card in ((skewed, model_card), (fair, model_card_cda)):
        co = res["bias"]["coreference"]["all"]
        want = row.format(*(f"{co[k]['value']} ({co[k]['ci'][0]} to {co[k]['ci'][1]}, n {co[k]['n']})"
                            for k in ("pro_accuracy", "anti_accuracy", "gap")))
        assert want in card
