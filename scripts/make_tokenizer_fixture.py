"""Writes the small CLIP-style BPE tokenizer that the offline micro models use (src/slimsd/models/fixtures/tokenizer).

Byte-level like CLIP's: every byte is a symbol, so any prompt tokenizes; whole-word merges exist only for the
words of the toy world and common prompt words. Run once; the output is committed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "on",
    "in",
    "at",
    "to",
    "is",
    "are",
    "photo",
    "picture",
    "image",
    "drawing",
    "painting",
    "render",
    "of",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "white",
    "black",
    "gray",
    "grey",
    "brown",
    "cyan",
    "magenta",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "heart",
    "rectangle",
    "disk",
    "dot",
    "shape",
    "shapes",
    "small",
    "large",
    "big",
    "tiny",
    "huge",
    "medium",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "middle",
    "upper",
    "lower",
    "corner",
    "background",
    "foreground",
    "bright",
    "dark",
    "light",
    "plain",
    "simple",
    "one",
    "two",
    "three",
    "single",
    "cat",
    "dog",
    "house",
    "tree",
    "car",
    "sky",
    "sunset",
    "mountain",
    "city",
    "portrait",
    "landscape",
    "astronaut",
    "horse",
    "high",
    "quality",
    "detailed",
    "blurry",
    "ugly",
    "bad",
    "low",
    "resolution",
    "watermark",
    "beautiful",
    "style",
    "art",
]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (bytes that print stay as they are)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def apply_bpe(word: str, merges: list[str]) -> list[str]:
    """Plain BPE: repeatedly join the adjacent pair with the lowest merge rank."""
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    parts = [*list(word[:-1]), word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


def main() -> None:
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(WORDS):
        # Join whatever the merges so far make of the word, left to right, until it is one token.
        parts = apply_bpe(word, merges)
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merges.append(f"{a} {b}")
            vocab.setdefault(a + b, len(vocab))
            parts = [a + b, *parts[2:]]
    broken = [w for w in WORDS if len(apply_bpe(w, merges)) != 1]
    assert not broken, f"words that do not tokenize to one token: {broken}"
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    out = Path(__file__).resolve().parents[1] / "src" / "slimsd" / "models" / "fixtures" / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main()
