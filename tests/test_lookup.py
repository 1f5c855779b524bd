"""Prompt-lookup drafting (device/lookup.py): pure, so tested on token lists."""
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge.device.lookup import MAX_NGRAM, MIN_NGRAM, propose


def test_it_proposes_what_followed_the_latest_occurrence_of_the_text_s_ending():
    #       0  1  2  3  4  5  6  7  8  9
    text = [5, 6, 7, 1, 5, 6, 8, 9, 5, 6]
    assert propose(text, 3) == [8, 9, 5]  # "5 6" last occurred at 4, followed by 8 9 5


def test_a_longer_match_wins_over_a_later_shorter_one():
    text = [1, 2, 3, 40, 41, 9, 2, 3, 50, 1, 2, 3]
    assert propose(text, 2) == [40, 41]  # "1 2 3" at 0 beats "2 3" at 6


def test_no_proposal_without_an_earlier_occurrence_of_min_ngram_tokens():
    assert propose([1, 2, 3, 4, 5, 3], 4) == []  # only one token repeats: below MIN_NGRAM
    assert propose([], 4) == [] and propose([1, 2, 1, 2], 0) == []


def test_a_proposal_stops_at_the_draft_length_and_at_the_text_s_end():
    text = [7, 8, 1, 2, 3, 7, 8]
    assert propose(text, 2) == [1, 2]
    assert propose(text, 50) == [1, 2, 3, 7, 8]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=60), st.integers(1, 8))
def test_every_proposal_continues_an_earlier_occurrence_of_the_text_s_ending(text, draft_len):
    out = propose(text, draft_len)
    assert len(out) <= draft_len
    if not out:
        # No suffix of MIN_NGRAM..MAX_NGRAM tokens occurs earlier with a token after it.
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            if len(text) > n:
                assert all(text[i:i + n] != text[-n:] for i in range(len(text) - n))
        return
    assert any(text[i:i + n + len(out)] == text[-n:] + out
               for n in range(MIN_NGRAM, MAX_NGRAM + 1) if len(text) > n
               for i in range(len(text) - n))
