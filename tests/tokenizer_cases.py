"""Deterministic test strings for the tokenizer, shared by tests/test_tokenizer.py and
benchmarks/bench_tokenizer.py: every category where a SentencePiece reimplementation can
go wrong (scripts, emoji and ZWJ sequences, combining marks, whitespace runs, control
characters, very long words, digits, literal special-token text, the empty string), and
random mixes of them.
"""
from __future__ import annotations

import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "python" / "openelm_rt" / "data" / "corpus.txt"

# (first, last) code point ranges per script
SCRIPTS = {
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF)],
    "cjk": [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3)],
    "cyrillic": [(0x0410, 0x044F)],
    "arabic": [(0x0620, 0x064A)],
    "devanagari": [(0x0904, 0x0939), (0x093E, 0x094D)],
    "greek": [(0x0391, 0x03C9)],
    "rare": [(0x10000, 0x1FFFF), (0x20000, 0x2FFFF), (0xE000, 0xF8FF)],  # astral, private use
}
COMBINING = [chr(c) for c in range(0x0300, 0x0370)]
EMOJI = ["🙂", "😀", "🚀", "❤️", "👍🏽", "🇫🇷", "🏳️‍🌈", "👨‍👩‍👧‍👦", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "#️⃣", "🫠"]
CONTROL = [chr(c) for c in list(range(0, 32)) + [0x7F] + list(range(0x80, 0xA0))] + ["\u200b", "\u200d", "\ufeff", "\u2028"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \t ", "\u00a0", "\u3000", "\u2581", "\u2581\u2581"]
LITERALS = ["<s>", "</s>", "<unk>", "<pad>", "<0x41>", "<0xFF>", "<|user|>", "<|assistant|>", "[INST]", "▁the"]


def _word(rng: random.Random, script: str, lo=1, hi=10) -> str:
    ranges = SCRIPTS[script]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(lo, hi)))


def _corpus_words() -> list:
    return CORPUS.read_text(encoding="utf-8").split()


def _piece(rng: random.Random, words: list) -> str:
    """One random fragment of any category."""
    k = rng.randrange(10)
    if k == 0:
        return rng.choice(words)
    if k == 1:
        return _word(rng, rng.choice(list(SCRIPTS)))
    if k == 2:
        return rng.choice(EMOJI)
    if k == 3:
        return _word(rng, "latin", 1, 4) + "".join(rng.choice(COMBINING) for _ in range(rng.randint(1, 3)))
    if k == 4:
        return rng.choice(SPACES)
    if k == 5:
        return rng.choice(CONTROL)
    if k == 6:
        return str(rng.randint(0, 10 ** rng.randint(1, 12)))
    if k == 7:
        return rng.choice(LITERALS)
    if k == 8:
        return rng.choice(words).upper()
    return chr(rng.randint(0x20, 0x7E))


def cases(n: int = 10_000, seed: int = 0) -> list:
    """n strings: fixed edge cases first, then each category alone, then random mixes."""
    rng = random.Random(seed)
    words = _corpus_words()
    fixed = ["", " ", "  ", "\t", "\n", " \n ", "a", " a", "a ", " a ", "  leading", "trailing  ",
             "<s>", "</s>", "<s>hello</s>", "<unk>", "\u2581", "\u2581hello", "hello\u2581world",
             "\x00", "\ufffd", "a" * 5000, "ab" * 3000, "9" * 1000, " " * 300, "\n" * 50,
             "東京" * 500, "🙂" * 200, "e\u0301" * 100, "The capital of France is"]
    out = list(fixed)
    categories = [
        lambda: rng.choice(words),
        lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 20))),
        lambda: _word(rng, "cjk", 1, 40),
        lambda: " ".join(_word(rng, "cyrillic") for _ in range(rng.randint(1, 6))),
        lambda: " ".join(_word(rng, "arabic") for _ in range(rng.randint(1, 6))),
        lambda: " ".join(_word(rng, "devanagari") for _ in range(rng.randint(1, 6))),
        lambda: "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 5))),
        lambda: "".join(_piece(rng, words) + rng.choice(COMBINING) for _ in range(rng.randint(1, 4))),
        lambda: "".join(rng.choice(SPACES) + rng.choice(words) for _ in range(rng.randint(1, 5))) + rng.choice(SPACES),
        lambda: "".join(rng.choice(CONTROL + [" ", "x"]) for _ in range(rng.randint(1, 12))),
        lambda: _word(rng, "latin", 50, 400),
        lambda: str(rng.randint(0, 10 ** 30)) + rng.choice(["", ".", ",", " "]) + str(rng.random()),
        lambda: rng.choice(SPACES) + rng.choice(LITERALS) + rng.choice(words) + rng.choice(LITERALS),
        lambda: _word(rng, "rare", 1, 6),
    ]
    while len(out) < n:
        if rng.random() < 0.5:
            out.append(rng.choice(categories)())
        else:
            out.append("".join(_piece(rng, words) for _ in range(rng.randint(1, 30))))
    return out[:n]
