"""Local text that every machine has: Python's own documentation, shipped with CPython.

Used to train the demo trajectory and to build the offline eval task pack. Documents are split
into train and held-out sets by a stable hash of their title, so the two never overlap.
"""

from __future__ import annotations

import hashlib


def python_docs() -> dict[str, str]:
    """Title -> text of the Python reference topics (``pydoc_data.topics``), about 460 KB."""
    from pydoc_data.topics import topics

    return {k: v for k, v in sorted(topics.items()) if len(v.strip()) > 200}


def is_heldout(title: str, *, fraction: float = 0.2) -> bool:
    """Stable split: a document is held out when the hash of its title falls under ``fraction``."""
    h = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_docs(fraction: float = 0.2) -> tuple[dict[str, str], dict[str, str]]:
    """(train, heldout) dicts of :func:`python_docs`."""
    docs = python_docs()
    train = {k: v for k, v in docs.items() if not is_heldout(k, fraction=fraction)}
    held = {k: v for k, v in docs.items() if is_heldout(k, fraction=fraction)}
    return train, held
