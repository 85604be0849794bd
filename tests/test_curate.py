"""Curation end to end on corpora made here: planted exact/near duplicates, PII and contamination
are handled and nothing else is touched; every document is accounted for; 1 and 2 workers give
identical bytes; bad inputs are counted with reasons; resume, completeness and executors; the
curate settings reach curation from the command line."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest

from candorlm.config import CurateConfig
from candorlm.data.curate import build_executors, curate, is_complete
from candorlm.data.ledger import read_jsonl
from candorlm.errors import CandorError
from synthetic import code, edit_words, prose, sentence

EMAIL, PHONE, TOKEN = "jane.doe@corpmail.net", "415-555-0132", "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"


def _tree(root) -> dict[str, bytes]:
    out = {}
    for sub in ("documents", "removed"):
        for name in sorted(os.listdir(root / sub)):
            out[f"{sub}/{name}"] = (root / sub / name).read_bytes()
    return out


def _docs(out) -> dict[str, dict]:
    docs = {}
    for name in sorted(os.listdir(out / "documents")):
        for d in read_jsonl(str(out / "documents" / name)):
            docs[d["id"]] = d
    return docs


def _removed(out) -> dict[str, dict]:
    recs = {}
    for name in sorted(os.listdir(out / "removed")):
        for r in read_jsonl(str(out / "removed" / name)):
            recs[r["id"]] = r
    return recs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 prose and 20 code files, plus planted: two exact copies, a prose and a code near copy
    (3 and 2 words edited), a document with PII and one containing an eval-set text."""
    base = tmp_path_factory.mktemp("curate")
    root = base / "corpus"
    (root / "prose").mkdir(parents=True)
    (root / "code").mkdir()
    rng = random.Random(7)
    texts = {}
    for i in range(40):
        texts[f"prose/p{i:02d}.txt"] = prose(rng)
    for i in range(20):
        texts[f"code/m{i:02d}.py"] = code(rng)
    eval_text = " ".join(sentence(rng) for _ in range(4))
    texts["prose/p03_copy.txt"] = texts["prose/p03_copy2.txt"] = texts["prose/p03.txt"]
    texts["prose/p05_near.txt"] = edit_words(rng, texts["prose/p05.txt"], 3)
    texts["code/m04_near.py"] = edit_words(rng, texts["code/m04.py"], 2)
    texts["prose/p10.txt"] += f"\nWrite to {EMAIL} or call {PHONE} about the river.\nThe key is {TOKEN} for now.\n"
    texts["prose/p12.txt"] += "\n" + eval_text + "\n"
    for rel, t in texts.items():
        (root / rel).write_text(t)
    evalset = base / "evalset.txt"
    evalset.write_text(eval_text + "\n\n" + sentence(rng) + " " + sentence(rng) + "\n")
    return root, evalset, texts


def _cfg(evalset, **kw) -> CurateConfig:
    return CurateConfig(tasks=3, decontaminate_files=[str(evalset)], **kw)


@pytest.fixture(scope="module")
def run1(corpus, tmp_path_factory):
    root, evalset, _ = corpus
    out = tmp_path_factory.mktemp("out1") / "data"
    stats = curate(str(root), str(out), _cfg(evalset), workers=1, quiet=True)
    return out, stats


EXPECTED_REMOVED = {
    "prose/p03_copy.txt": ("dedup", "exact_duplicate"), "prose/p03_copy2.txt": ("dedup", "exact_duplicate"),
    "prose/p05_near.txt": ("dedup", "near_duplicate"), "code/m04_near.py": ("dedup", "near_duplicate"),
    "prose/p12.txt": ("decontamination", "evalset"),
}


def test_planted_duplicates_and_contamination_removed_and_nothing_else(run1, corpus):
    out, stats = run1
    removed = _removed(out)
    assert {k: (r["stage"], r["reason"]) for k, r in removed.items()} == EXPECTED_REMOVED
    assert removed["prose/p03_copy2.txt"]["metadata"]["duplicate_of"] == "prose/p03.txt"
    assert removed["code/m04_near.py"]["metadata"]["duplicate_of"] == "code/m04.py"
    assert stats["dedup"]["exact_removed"] == 2 and stats["dedup"]["near_removed"] == 2
    assert stats["decontam"] == {"evalset": 1, "pycomplete": 0}
    docs = _docs(out)
    assert len(docs) == len(corpus[2]) - len(EXPECTED_REMOVED)
    assert docs["prose/p07.txt"]["text"] == corpus[2]["prose/p07.txt"]  # filters did not edit clean text


def test_pii_masked_and_counted(run1):
    out, stats = run1
    doc = _docs(out)["prose/p10.txt"]
    assert EMAIL not in doc["text"] and PHONE not in doc["text"] and TOKEN not in doc["text"]
    assert "<EMAIL>" in doc["text"] and "<PHONE>" in doc["text"] and "<SECRET>" in doc["text"]
    assert doc["metadata"]["pii"] == {"email": 1, "phone": 1, "secret": 1}
    assert stats["pii"] == {"email": 1, "phone": 1, "secret": 1} and stats["pii_documents"] == 1


def test_accounting_outputs_and_reported_settings(run1, corpus):
    out, stats = run1
    n = len(corpus[2])
    assert stats["read"] == n == stats["kept"] + sum(stats["removed"].values()) + sum(stats["failed"].values())
    acc = stats["accounting"]
    for k in ("docs", "bytes"):
        assert acc[k]["read"] == acc[k]["kept"] + acc[k]["removed"] + acc[k]["failed"]
    assert stats["accounting_ok"] and stats["failed"] == {}
    assert stats["bytes_in"] == sum(len(t.encode()) for t in corpus[2].values())
    assert stats["stages"][-1]["out"] == stats["kept"]
    assert stats["kept_by_type"]["code"]["docs"] == 20 and stats["kept_by_type"]["prose"]["docs"] == 39
    card = (out / "DATA_CARD.md").read_text()
    assert "Exact duplicates removed: 2" in card and "evalset" in card
    assert stats["filters"]["gopher_quality"]["min_doc_words"] == 50
    assert stats["filters"]["code_quality"]["max_line_length"] == 1000
    b, r = stats["dedup"]["bands"], stats["dedup"]["rows"]
    assert stats["dedup"]["threshold"] == pytest.approx((1 / b) ** (1 / r), abs=1e-4)
    d = _docs(out)["code/m07.py"]
    assert set(d) == {"text", "id", "metadata"}
    assert d["metadata"]["type"] == "code" and d["metadata"]["path"] == "code/m07.py" and d["metadata"]["line"] == 1
    assert os.path.isdir(out / "work" / "logs" / "process" / "completions")
    assert is_complete(str(out), str(corpus[0]), _cfg(corpus[1]))
    assert not is_complete(str(out), str(corpus[0]), _cfg(corpus[1], pii="drop"))


def test_one_and_two_workers_give_identical_output(run1, corpus, tmp_path):
    out1, stats1 = run1
    out2 = tmp_path / "data"
    stats2 = curate(str(corpus[0]), str(out2), _cfg(corpus[1]), workers=2, quiet=True)
    assert _tree(out1) == _tree(out2)
    strip = lambda s: {k: v for k, v in s.items() if k not in ("timings_s", "cpu_s", "workers")}  # noqa: E731
    assert strip(stats1) == strip(stats2)


def test_resume_redoes_only_unfinished_tasks(corpus, tmp_path):
    out = tmp_path / "data"
    cfg = _cfg(corpus[1])
    curate(str(corpus[0]), str(out), cfg, workers=1, quiet=True)
    before = _tree(out)
    cand = out / "work" / "parts" / "process" / "candidates"
    mtimes = {p: os.stat(cand / p).st_mtime_ns for p in os.listdir(cand)}
    # an interruption during the final phase: task 1 unfinished, no stats.json yet
    os.unlink(out / "stats.json")
    os.unlink(out / "work" / "logs" / "final" / "completions" / "00001")
    os.unlink(out / "documents" / "00001.jsonl")
    assert not is_complete(str(out), str(corpus[0]), cfg)
    stats = curate(str(corpus[0]), str(out), cfg, workers=1, quiet=True)
    assert _tree(out) == before and stats["accounting_ok"]
    assert {p: os.stat(cand / p).st_mtime_ns for p in os.listdir(cand)} == mtimes  # process phase not redone
    # a finished output is returned as is
    assert curate(str(corpus[0]), str(out), cfg, workers=1, quiet=True)["fingerprint"] == stats["fingerprint"]


def test_bad_inputs_are_counted_and_the_cli_exits_0(tmp_path, capsys):
    from candorlm.cli import main

    root = tmp_path / "bad"
    root.mkdir()
    rng = random.Random(5)
    for i in range(3):
        (root / f"ok{i}.md").write_text(prose(rng))
    (root / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (root / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    (root / "empty.txt").write_bytes(b"")
    with open(root / "oneline.txt", "wb") as f:  # a single 200 MB line
        for _ in range(200):
            f.write(b"x" * (1 << 20))
    locked = root / "locked.txt"
    locked.write_text(prose(rng))
    os.chmod(locked, 0)  # blocks reading unless the tests run as root
    os.symlink(root / "nowhere", root / "dangling.txt")
    os.symlink(root, root / "loop")
    out = tmp_path / "data"
    main(["data", "--source", str(root), "--out", str(out), "--workers", "2", "--tasks", "2"])  # no SystemExit
    stats = json.loads((out / "stats.json").read_text())
    assert stats["accounting_ok"]
    by = {**stats["removed"], **stats["failed"]}
    assert by["read_error:binary"] == 1 and by["read_error:invalid_utf8"] == 1
    assert by["size:empty"] == 1 and by["size:too_large"] == 1
    assert stats["accounting"]["removed_bytes"]["size:too_large"] == 200 << 20
    assert by["read_error:symlink_loop"] == 1
    assert by["read_error:unreadable"] == (1 if os.geteuid() == 0 else 2)  # root reads a chmod-000 file
    assert stats["kept"] == 3 + (os.geteuid() == 0)
    assert stats["read"] == 10
    big = [r for r in read_jsonl(str(out / "removed" / "size.jsonl")) if r["reason"] == "too_large"][0]
    assert big["id"] == "oneline.txt" and len(big["text"]) <= 1000


def test_jsonl_source_with_malformed_lines(tmp_path):
    rng = random.Random(6)
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join([json.dumps({"text": prose(rng)}), '{"text": "unterminated', json.dumps({"title": "x"}),
                            json.dumps({"text": prose(rng)})]) + "\n")
    stats = curate(str(p), str(tmp_path / "data"), CurateConfig(), workers=1, quiet=True)
    assert stats["read"] == 4 and stats["kept"] == 2
    assert stats["failed"] == {"read_error:malformed_json": 1, "read_error:missing_text": 1}
    assert stats["accounting"]["failed_bytes"] == {"read_error:malformed_json": 23, "read_error:missing_text": 15}
    assert sorted(_docs(tmp_path / "data")) == ["in.jsonl:1", "in.jsonl:4"]


def test_pii_drop_mode_removes_documents_with_pii(tmp_path):
    rng = random.Random(4)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "clean.txt").write_text(prose(rng))
    (tmp_path / "c" / "leaky.txt").write_text(prose(rng) + f"Mail {EMAIL} today.\n")
    stats = curate(str(tmp_path / "c"), str(tmp_path / "data"), CurateConfig(pii="drop"), workers=1, quiet=True)
    assert stats["removed"] == {"pii:pii_found": 1} and stats["pii"] == {"email": 1} and stats["accounting_ok"]
    rec = _removed(tmp_path / "data")["leaky.txt"]
    assert rec["metadata"]["pii"] == {"email": 1}


def test_prose_filters_skip_code_and_code_filters_skip_prose():
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    from candorlm.data.filters import CodeQualityFilter, TypedFilter

    rng = random.Random(11)
    src, txt = Document(text=code(rng), id="a.py", metadata={"type": "code"}), \
        Document(text=prose(rng), id="b.txt", metadata={"type": "prose"})
    gopher, strict_code = GopherQualityFilter(min_doc_words=10**6), CodeQualityFilter(max_line_length=5)
    assert gopher.filter(src) is not True and strict_code.filter(txt) is not True  # each would remove the other
    assert TypedFilter(gopher, "prose").filter(src) is True
    assert TypedFilter(strict_code, "code").filter(txt) is True
    assert TypedFilter(strict_code, "code").filter(src) == (False, "max_line_length")


def test_decide_keeps_the_first_document_of_each_cluster(tmp_path):
    import struct

    from candorlm.data.dedup import decide

    idx = tmp_path / "parts" / "process" / "index"
    idx.mkdir(parents=True)
    (idx / "00000.tsv").write_text("h1\tA\nh1\tA2\nh2\tB\n")
    (idx / "00001.tsv").write_text("h3\tC\nh4\tD\nh5\tE\n")
    (tmp_path / "minhash" / "buckets").mkdir(parents=True)
    # LSH pairs: A2~B (so B joins A's cluster through A's exact copy), E~D, and D~C across tasks
    pairs = [(0, 1, 0, 2), (1, 2, 1, 1), (1, 1, 1, 0)]
    (tmp_path / "minhash" / "buckets" / "00000_00.dups").write_bytes(b"".join(struct.pack("<4I", *p) for p in pairs))
    summary = decide(str(tmp_path), 2, exact=True, near=True)
    got = {}
    for r in range(2):
        for x in read_jsonl(str(tmp_path / "dedup" / f"{r:05d}.jsonl")):
            got[x["id"]] = (x["reason"], x["duplicate_of"])
    assert got == {"A2": ("exact_duplicate", "A"), "B": ("near_duplicate", "A"), "D": ("near_duplicate", "C"),
                   "E": ("near_duplicate", "C")}
    assert summary["exact_duplicates"] == 1 and summary["near_duplicates"] == 3 and summary["clusters"] == 2


def test_fast_minhash_signature_equals_datatrove():
    from candorlm.data.dedup import signature_step

    rng = random.Random(9)
    texts = [prose(rng), code(rng), "Caf\u00e9 na\u00efve 12,5 \u00c5ngstr\u00f6m " * 20, "too short", ""]
    for cfg in (CurateConfig(), CurateConfig(minhash_bands=3, minhash_rows=4)):
        fast, ref = signature_step(cfg, "/tmp/unused", fast=True), signature_step(cfg, "/tmp/unused", fast=False)
        for t in texts:
            a, b = fast.get_shingles(t), ref.get_shingles(t)
            assert (a == b).all()
            if b.size:
                assert fast.get_signature(a) == ref.get_signature(b)


def test_user_errors_are_one_line_candor_errors(tmp_path):
    from candorlm.cli import main

    with pytest.raises(CandorError, match="source '.*nope' does not exist; accepted: stdlib, a directory, .txt"):
        curate(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "file").write_text("")
    with pytest.raises(CandorError, match="cannot write to output directory"):
        curate(str(tmp_path / "a.txt"), str(tmp_path / "file" / "out"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(CandorError, match="not empty and not a `candor data` output"):
        curate(str(tmp_path / "a.txt"), str(tmp_path / "mine"))
    with pytest.raises(CandorError, match="evaluation file .* does not exist"):
        curate(str(tmp_path / "a.txt"), str(tmp_path / "out"), CurateConfig(decontaminate_files=["/no/such.txt"]))
    with pytest.raises(SystemExit) as e:
        main(["data", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2


class _Stop(Exception):
    pass


def _capture_curate(monkeypatch) -> list:
    """Replace curation with a recorder of the config it is given (and a stop for `candor run`)."""
    import candorlm.data.curate as curation

    seen = []

    def fake(source, out, cfg=None, *args, **kw):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(curation, "curate", fake)
    monkeypatch.setattr(curation, "is_complete", lambda *a, **k: False)
    return seen


def test_cli_flags_and_set_reach_curation(monkeypatch, tmp_path):
    from candorlm.cli import main

    seen = _capture_curate(monkeypatch)
    with pytest.raises(_Stop):
        main(["data", "--source", "stdlib", "--out", str(tmp_path / "d"), "--pii", "drop", "--no-exact-dedup",
              "--no-c4-quality", "--cda", "gender", "--decontaminate-files", "x.txt", "--minhash-bands", "9",
              "--set", "curate.split=percent", "--set", "curate.preset=curated", "--workers", "1"])
    cfg = seen[-1]
    assert cfg.pii == "drop" and not cfg.exact_dedup and cfg.near_dedup and cfg.c4_quality is False
    assert cfg.cda == "gender" and cfg.decontaminate_files == ["x.txt"] and cfg.minhash_bands == 9
    assert cfg.split == "percent" and cfg.preset == "curated" and cfg.workers == 1
    with pytest.raises(_Stop):
        main(["data", "--source", "stdlib", "--out", str(tmp_path / "d")])
    assert seen[-1] == CurateConfig()
    # `candor run --set curate.*` reaches the pipeline's curation
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("text\n")
    with pytest.raises(_Stop):
        main(["run", "--source", str(tmp_path / "src"), "--runs-dir", str(tmp_path / "runs"),
              "--set", "curate.pii=drop", "--set", "curate.text_sanity=false"])
    assert seen[-1].pii == "drop" and seen[-1].text_sanity is False


@pytest.mark.parametrize("argv, message", [
    (["data", "--source", "stdlib", "--out", "o", "--set", "curate.pii=nope"],
     "curate.pii=nope: choose one of mask, drop, off"),
    (["run", "--set", "curate.preset=books"], "curate.preset=books: choose one of auto, web, curated, code"),
    (["data", "--source", "stdlib", "--out", "o", "--split", "commas"],
     "curate.split='commas' is not one of auto, none, blank, percent, regex:PATTERN"),
    (["data", "--source", "stdlib", "--out", "o", "--set", "curate.split=regex:(x"], "not a regular expression"),
    (["data", "--source", "stdlib", "--out", "o", "--set", "train.lr=1"], "takes curation settings"),
])
def test_bad_curate_settings_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    from candorlm.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("candor: error: ") and message in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


def test_cda_adds_swapped_copies_and_audit_is_reported(tmp_path):
    rng = random.Random(8)
    root = tmp_path / "c"
    root.mkdir()
    for i in range(4):
        extra = "\nThe doctor said he would call his brother before the meeting ended today.\n" if i % 2 else ""
        (root / f"d{i}.txt").write_text(prose(rng) + extra)
    out = tmp_path / "data"
    stats = curate(str(root), str(out), CurateConfig(cda="gender"), workers=1, quiet=True)
    docs = _docs(out)
    assert sorted(k for k in docs if k.endswith("#cda")) == ["d1.txt#cda", "d3.txt#cda"]
    copy = docs["d1.txt#cda"]
    assert "she would call her sister" in copy["text"] and copy["metadata"]["cda_of"] == "d1.txt"
    assert stats["augmented"] == 2 and stats["kept"] == 4 and stats["accounting_ok"]
    assert stats["cda"] == {"mode": "add", "docs_added": 2, "audit_includes_copies": True}
    assert stats["audit"]["corpus"]["docs"] == 4 and stats["audit"]["after_cda"]["docs"] == 6
    assert "filter_removal" in stats["audit"]
    card = (out / "DATA_CARD.md").read_text()
    assert "Gender CDA was applied" in card and "Representation audit" in card


def test_ray_executor_matches_local(tmp_path):
    """A local Ray cluster curates a small corpus to the same bytes as the local executor (~30 s).
    `ray` is a test dependency (not a runtime one); outside CI a missing ray skips."""
    if importlib.util.find_spec("ray") is None:
        from conftest import missing

        missing("ray")
    import ray

    rng = random.Random(10)
    (tmp_path / "c").mkdir()
    for i in range(6):
        (tmp_path / "c" / f"d{i}.txt").write_text(prose(rng))
    (tmp_path / "c" / "d6.txt").write_text((tmp_path / "c" / "d0.txt").read_text())
    cfg = CurateConfig(tasks=2, minhash_bands=4, minhash_rows=4)
    curate(str(tmp_path / "c"), str(tmp_path / "local"), cfg, workers=2, quiet=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stats = curate(str(tmp_path / "c"), str(tmp_path / "ray"), cfg, workers=2, executor="ray", quiet=True)
    finally:
        ray.shutdown()
    assert stats["removed"] == {"dedup:exact_duplicate": 1} and stats["executor"] == "ray"
    assert _tree(tmp_path / "local") == _tree(tmp_path / "ray")


def test_planted_occupation_skew_is_reported_and_cda_output_is_not(tmp_path):
    rng = random.Random(11)
    root = tmp_path / "c"
    root.mkdir()
    for i in range(12):
        planted = ("\nThe doctor said he would review the engineer report, and he signed it before noon.\n"
                   "The nurse said she would help the secretary, and she filed the notes after lunch.\n")
        (root / f"d{i}.txt").write_text(prose(rng) + planted)
    stats = curate(str(root), str(tmp_path / "data"), CurateConfig(cda="gender"), workers=1, quiet=True)
    assert stats["kept"] == 12
    assert stats["audit"]["corpus"]["skewed"] is True
    assert stats["audit"]["after_cda"]["skewed"] is False
    card = (tmp_path / "data" / "DATA_CARD.md").read_text()
    assert "Before augmentation" in card


def test_slurm_and_ray_executors_get_the_same_pipelines(tmp_path):
    from datatrove.executor import SlurmPipelineExecutor
    from datatrove.executor.ray import RayPipelineExecutor

    from candorlm.data.curate import _phase_pipelines
    from candorlm.data.sources import resolve_source

    cfg = CurateConfig(slurm_partition="cpu")
    (tmp_path / "a.txt").write_text("x\n")
    phases = _phase_pipelines(cfg, resolve_source(str(tmp_path / "a.txt")), str(tmp_path / "work"), 4)
    for kind, cls in (("slurm", SlurmPipelineExecutor), ("ray", RayPipelineExecutor)):
        exs = build_executors(phases, cfg, str(tmp_path / "work"), 4, 8, kind)
        assert list(exs) == ["process", "buckets", "decide", "final"]
        assert all(isinstance(e, cls) for e in exs.values())
        assert [e.world_size for e in exs.values()] == [4, cfg.minhash_bands, 1, 4]
        assert exs["final"].depends is exs["decide"] and exs["process"].pipeline is phases["process"]
    with pytest.raises(CandorError, match="curate.slurm_partition"):
        build_executors(phases, CurateConfig(), str(tmp_path / "work"), 4, 8, "slurm")



# ---------------------------------------------------------------------------------------------
# Presets that suit the source, and splitting text files into entries


def test_the_preset_follows_the_source_unless_set(tmp_path):
    from candorlm.data.curate import choose_preset
    from candorlm.data.sources import plan, resolve_source

    rng = random.Random(12)
    (tmp_path / "py").mkdir()
    (tmp_path / "notes").mkdir()
    for i in range(3):
        (tmp_path / "py" / f"m{i}.py").write_text(code(rng))
        (tmp_path / "notes" / f"n{i}.txt").write_text(prose(rng))
    (tmp_path / "py" / "README.md").write_text(prose(rng, 3))  # a little prose in a code directory
    (tmp_path / "a.txt").write_text(prose(rng))
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")

    def chosen(spec, **kw):
        src = resolve_source(spec)
        return choose_preset(CurateConfig(**kw), src, plan(src, 1 << 22))[0]

    assert [chosen(s) for s in ("stdlib", str(tmp_path / "py"), str(tmp_path / "notes"), str(tmp_path / "a.txt"),
                                str(tmp_path / "a.jsonl"))] == ["code", "code", "curated", "curated", "web"]
    assert chosen("stdlib", preset="web") == "web"
    # a filter set explicitly wins over its preset; the others follow it
    cfg = CurateConfig(c4_quality=True).resolved("curated")
    assert cfg.c4_quality and cfg.text_sanity and not cfg.gopher_quality and not cfg.code_quality
    web = CurateConfig().resolved("web")
    assert not web.text_sanity and all(getattr(web, k) for k in ("gopher_quality", "gopher_repetition", "c4_quality",
                                                                 "fineweb_quality", "code_quality"))


def test_text_sanity_removes_broken_text_only():
    from datatrove.data import Document

    from candorlm.data.filters import TextSanityFilter
    from candorlm.data.normalize import normalize_text

    f = TextSanityFilter()
    rng = random.Random(13)
    # what the web filters remove and this one keeps: short, list-like, repetitive, code
    for text in ("42\n", "Yow!\n", "- one\n- two\n", "na " * 300, code(rng),
                 "Caf\u00e9 cr\u00e8me, na\u00efve \u00c5ngstr\u00f6m.\n"):
        assert f.filter(Document(text=text, id="x")) is True, text[:40]
    broken = {
        "near_empty": "-\n",
        "binary_looking": "data: " + "QUJD" * 400 + "\n",
        "undecodable": "caf\ufffd na\ufffdve " * 20 + prose(rng, 2),
        # UTF-8 quotes read as cp1252 twice, a byte lost: normalization's ftfy repairs only some of it
        "mojibake": "The Ã¢â‚¬Å“bestÃ¢â‚¬Â prices Ã¢â‚¬Å“everÃ¢â‚¬Â.\n",
    }
    for reason, text in broken.items():
        assert f.filter(Document(text=normalize_text(text), id="x")) == (False, reason), reason


LICENSES = "/usr/share/common-licenses"


def test_plain_english_licenses_survive_the_curated_preset(tmp_path):
    """FineWeb's web filters remove Apache-2.0 and Artistic (char_dup_ratio) and both MPLs
    (gopher_below_alpha_threshold); a directory of prose is curated by default, which keeps them."""
    if not os.path.isdir(LICENSES):
        from conftest import missing

        missing(LICENSES + " (Debian's base-files)")
    wanted = {"Apache-2.0", "Artistic", "MPL-1.1", "MPL-2.0"}
    stats = curate(LICENSES, str(tmp_path / "curated"), CurateConfig(), workers=1, quiet=True)
    assert stats["preset"]["name"] == "curated" and stats["accounting_ok"]
    assert wanted <= set(_docs(tmp_path / "curated"))
    assert not any(r.split(":")[0] in ("gopher_quality", "fineweb_quality") for r in stats["removed"])
    assert "Preset: curated (auto: " in (tmp_path / "curated" / "DATA_CARD.md").read_text()
    curate(LICENSES, str(tmp_path / "web"), CurateConfig(preset="web"), workers=1, quiet=True)
    assert not wanted & set(_docs(tmp_path / "web"))  # the failure the curated preset avoids


def _fortunes(rng: random.Random, n: int) -> list[str]:
    """Quotes as fortune files hold them: one to three sentences, some in two paragraphs, some
    attributed, a few a word or two long."""
    quotes = []
    for i in range(n):
        q = " ".join(sentence(rng, 4, 12) for _ in range(rng.randint(1, 3)))
        if i % 5 == 1:
            q += "\n\n" + sentence(rng, 3, 8)
        if i % 4 == 2:
            q += f"\n\t\t-- {rng.choice(prose(rng, 1).split()).capitalize()} {rng.randint(1800, 1999)}"
        quotes.append(q + "\n")
    return quotes + ["42\n", "Yow!\n"]


def test_a_fortune_file_split_on_percent_is_one_document_per_quote(tmp_path):
    rng = random.Random(14)
    quotes = _fortunes(rng, 40)
    src = tmp_path / "fortunes.txt"
    src.write_text("%\n".join(quotes) + "%\n")
    cfg = CurateConfig(split="percent")
    stats = curate(str(src), str(tmp_path / "out"), cfg, workers=1, quiet=True)
    assert stats["preset"] == {"name": "curated", "why": "auto: a text file"}
    assert stats["read"] == len(quotes) and stats["kept"] == len(quotes), stats["removed"]
    docs = _docs(tmp_path / "out")
    assert [docs[f"fortunes.txt#{i + 1}"]["text"] for i in range(len(quotes))] == quotes
    assert docs["fortunes.txt#3"]["metadata"]["index"] == 3
    # the web preset removes most of them, as it did the Debian fortunes (41 of 43 files)
    web = curate(str(src), str(tmp_path / "web"), CurateConfig(split="percent", preset="web"), workers=1, quiet=True)
    assert web["kept"] < len(quotes) // 4
