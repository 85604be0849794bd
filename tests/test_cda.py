"""Gender CDA: two-sided swaps that keep case and word boundaries, the her/his heuristic,
and the augmentation helper."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candorlm.data import bias, cda
from candorlm.data.cda import augment, mentions_gender, swap_gender
from candorlm.errors import CandorError


@pytest.mark.parametrize("src,dst", [
    ("He is a king.", "She is a queen."),
    ("SHE SAID HE WAS THERE", "HE SAID SHE WAS THERE"),
    ("The men and women, boys and girls.", "The women and men, girls and boys."),
    ("Her book is on his desk.", "His book is on her desk."),
    ("I told her to wait and saw her.", "I told him to wait and saw him."),
    ("The book is his.", "The book is hers."),
    ("The book is hers, not his.", "The book is his, not hers."),
    ("He did it himself for his wife.", "She did it herself for her husband."),
    ("Mr. Smith met Mrs. Jones and Ms Lee.", "Ms. Smith met Mr. Jones and Mr Lee."),
    ("Guido said he would merge it.", "Guido said she would merge it."),  # names stay
])
def test_swaps(src, dst):
    assert swap_gender(src) == dst


@pytest.mark.parametrize("text", [
    "The sheet said hello; themes, manners and the shell stay.",
    "his_count = he_value + sheet",
    "self.man = 3; os.path.join(p, 'share/man'); open('x.man'); mail yes@man.com",
    "it took 10 ms and 3 MS-DOS boxes",
    "",
])
def test_untouched(text):
    assert swap_gender(text) == text


def test_bare_identifiers_are_swapped_consistently():
    code = "man = logging.Manager(None)\nman.setLoggerClass(C)\n"
    assert swap_gender(code) == "woman = logging.Manager(None)\nwoman.setLoggerClass(C)\n"


def test_every_audited_gendered_word_swaps_to_the_other_side():
    for side, other in (("male", "female"), ("female", "male")):
        for w in bias.GENDERED[side]:
            for follow in (" book", "."):  # both branches of the her/his heuristic
                swapped = swap_gender(w + follow)[: -len(follow)]
                assert swapped in bias.GENDERED[other], (w, swapped)


_UNAMBIGUOUS = sorted(w for w in cda.SWAP
                      if w not in {"her", "his", "him", "hers", "mum", "mums", "lady", "ladies", "madam"})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_UNAMBIGUOUS + ["the", "doctor", "sheet"]),
                          st.sampled_from(["lower", "title", "upper"])), max_size=20))
def test_swapping_twice_restores_unambiguous_text(words):
    text = " ".join(getattr(w, case)() for w, case in words)
    assert swap_gender(swap_gender(text)) == text


def test_mentions_gender():
    assert mentions_gender("Ask her.") and mentions_gender("Dear Mr. Smith")
    assert not mentions_gender("def sheet(): return 10 * ms")


def test_augment_add_and_replace():
    recs = [{"id": "a", "text": "he is a doctor", "metadata": {"src": "x"}}, {"id": "b", "text": "no people here"},
            {"id": "c", "text": "see share/man"}]
    added = list(augment(recs))
    assert [r["id"] for r in added] == ["a", "a#cda", "b", "c"]
    assert added[1]["text"] == "she is a doctor"
    assert added[1]["metadata"] == {"src": "x", "cda": "gender", "cda_of": "a"}
    replaced = list(augment(recs, mode="replace"))
    assert [r["id"] for r in replaced] == ["a#cda", "b", "c"]
    with pytest.raises(CandorError):
        list(augment(recs, mode="both"))
