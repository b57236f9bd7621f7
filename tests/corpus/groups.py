"""The corpus's groups and tiers, shared by the full tier (``test_corpus.py``: nbgrader and the
sandbox) and the fast tier (``test_corpus_fast.py``: in-process). Two files, so that pytest-xdist
runs the two tiers on different workers at the same time."""
from __future__ import annotations

from . import attacks, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08

# Each group is one chapter's cases (chapter 1's attacks on the flow are a group of their own).
CORPORA = {"ch01_attention": ch01.CASES, "ch01_attacks": attacks.CASES, "ch02_masking": ch02.CASES,
           "ch03_multihead": ch03.CASES, "ch04_positions": ch04.CASES,
           "ch05_encoder": ch05.CASES, "ch06_decoder": ch06.CASES,
           "ch07_translation": ch07.CASES, "ch08_efficient": ch08.CASES}
CHAPTER = {"ch01_attacks": "ch01_attention"}
FULL_TIER = {group: [c for c in cases if c.through_nbgrader] for group, cases in CORPORA.items()}
# A case that only makes sense on disk (a file name, planted files) is graded through nbgrader only.
FAST_TIER = {group: [c for c in cases if not c.hostile and c.in_fast_tier and c.filename is None and c.setup is None]
             for group, cases in CORPORA.items()}
