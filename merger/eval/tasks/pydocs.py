"""The documents of merger's offline task pack, built from held-out Python documentation.

Two record lists, both derived deterministically from :func:`merger.eval.textdata.split_docs`'s held-out
documents (never from the train split, on which the demo trajectory is trained):

* ``ppl_records``: passages of at most ``PASSAGE_CHARS`` characters, cut at paragraph (else line)
  boundaries, for a ``loglikelihood_rolling`` task (word/byte perplexity, bits per byte).
* ``mc_records``: "which of four texts continues this passage?". The context is up to
  ``CONTEXT_CHARS`` characters of a passage (whitespace collapsed), the true continuation the next
  words (about ``CONTINUATION_CHARS`` characters, starting with a space) and three distractors are
  continuations taken from other held-out documents. The gold position is drawn from a seeded
  RNG, so a model that always picks one slot scores 25%.

The text is whatever ``pydoc_data.topics`` the running CPython ships, so the numbers are
comparable between models evaluated with the same Python minor version (the pack folder name
carries a digest of the data).
"""

from __future__ import annotations

import random
import re

PASSAGE_CHARS = 1500  # upper bound of one perplexity passage (characters)
CONTEXT_CHARS = 256  # multiple-choice context, characters before the cut
CONTINUATION_CHARS = 48  # multiple-choice continuation: whole words, at least this many characters
MAX_CONTINUATION_CHARS = 96  # longer ones (a long "word") are skipped: fits 128-token byte models
MC_STRIDE = 400  # one multiple-choice item about every MC_STRIDE characters of a passage
N_CHOICES = 4
SEED = 20240501  # fixed: the pack must be the same on every machine with the same Python docs


def passages(docs: dict[str, str], *, max_chars: int = PASSAGE_CHARS) -> list[tuple[str, str]]:
    """Cut documents into ``(title, passage)`` pairs of at most ``max_chars`` characters.

    Paragraphs (blank-line separated) are packed greedily; a paragraph longer than ``max_chars``
    is cut at line boundaries (and a line longer than that, hard). Order follows the titles.
    """
    out: list[tuple[str, str]] = []
    for title in sorted(docs):
        pieces: list[str] = []
        for para in re.split(r"\n[ \t]*\n", docs[title].strip()):
            para = para.strip("\n")
            if not para.strip():
                continue
            if len(para) <= max_chars:
                pieces.append(para)
                continue
            chunk = ""
            for line in para.split("\n"):
                while len(line) > max_chars:  # a huge single line: hard cut
                    if chunk:
                        pieces.append(chunk)
                        chunk = ""
                    pieces.append(line[:max_chars])
                    line = line[max_chars:]
                if chunk and len(chunk) + 1 + len(line) > max_chars:
                    pieces.append(chunk)
                    chunk = ""
                chunk = f"{chunk}\n{line}" if chunk else line
            if chunk:
                pieces.append(chunk)
        current = ""
        for piece in pieces:
            if current and len(current) + 2 + len(piece) > max_chars:
                out.append((title, current))
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
        if current.strip():
            out.append((title, current))
    return out


def ppl_records(docs: dict[str, str]) -> list[dict]:
    """One ``{"id", "title", "text"}`` record per passage, for the perplexity task."""
    return [{"id": i, "title": title, "text": text}
            for i, (title, text) in enumerate(passages(docs))]


def _cuts(words: list[str]) -> list[tuple[str, str]]:
    """(context, continuation) pairs from one passage's words, about every ``MC_STRIDE`` chars.

    The context ends on a word; the continuation is `` w1 w2 ...`` (leading space, whole words,
    at least ``CONTINUATION_CHARS`` and at most ``MAX_CONTINUATION_CHARS`` characters), so the
    context/continuation boundary is the natural token boundary of BPE and byte tokenizers alike.
    """
    starts = [0]  # character offset of each word in " ".join(words)
    for w in words[:-1]:
        starts.append(starts[-1] + len(w) + 1)
    text = " ".join(words)
    out = []
    target = CONTEXT_CHARS // 2  # the first cut leaves some context
    for k, pos in enumerate(starts):
        if k == 0 or pos < target:
            continue
        end = k
        while end < len(words) and starts[end] + len(words[end]) - pos < CONTINUATION_CHARS:
            end += 1
        if end >= len(words):
            break
        cont_end = starts[end] + len(words[end])
        if cont_end - (pos - 1) > MAX_CONTINUATION_CHARS:
            continue
        ctx_start = next(s for s in starts if s >= pos - 1 - CONTEXT_CHARS)
        out.append((text[ctx_start:pos - 1], text[pos - 1:cont_end]))
        target = cont_end + MC_STRIDE - CONTEXT_CHARS // 2
    return out


def mc_records(docs: dict[str, str], *, seed: int = SEED) -> list[dict]:
    """``{"id", "title", "context", "choices", "gold"}`` records for the multiple-choice task.

    Distractors are true continuations of items from *other* documents, so every choice is
    fluent Python-docs text and only the link to the context tells the gold one apart.
    """
    items: list[tuple[str, str, str]] = []  # (title, context, continuation)
    for title, text in passages(docs):
        items += [(title, ctx, cont) for ctx, cont in _cuts(text.split())]
    rng = random.Random(seed)
    records = []
    for i, (title, ctx, cont) in enumerate(items):
        pool = [c for t, _, c in items if t != title and c != cont]
        distractors: list[str] = []
        while len(distractors) < N_CHOICES - 1:
            c = pool[rng.randrange(len(pool))]
            if c not in distractors:
                distractors.append(c)
        gold = rng.randrange(N_CHOICES)
        choices = distractors[:gold] + [cont] + distractors[gold:]
        records.append({"id": i, "title": title, "context": ctx, "choices": choices, "gold": gold})
    return records
