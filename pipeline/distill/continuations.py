"""The teacher's draws as continuations of the text a student position has seen.

A student position at byte b predicts its next token given the text before b, and given that
its own tokenization has a boundary at b. The teacher's stored draws at a teacher position
predict the teacher token starting there. Where b falls inside the teacher token that starts at
byte a < b (``s`` = the text from a to b is already seen), every drawn teacher entry that
begins with ``s`` and goes on is a continuation of the seen text: the student's split of that
entry, if it has a boundary after ``s``, names the student token that comes next. Those draws,
counted for that token, are the teacher's distribution of the student's next token there,
conditioned as the student is (on the text so far and a student boundary at b); draws that do
not begin with ``s``, or whose split has no boundary there, cannot have happened. An entry equal
to ``s`` (a teacher boundary at b) leaves the next token to a distribution the store does not
hold at this position, and is left out.

Where b is also a teacher token start (``exact_matches.py`` maps the teacher's draws of the
token starting at b), the teacher's own distribution there is conditioned on *its* boundary at
b, which the student's context does not say: the token before could have gone on. The entry
drawn for that previous token either equals the seen text ``s`` (probability: the stored
log-prob of the realized token, exact) or continues it, as above; the two are mixed by those
masses. This undoes one level of the tokenization bias (Phan et al. 2024, exact byte-level
probabilities from tokenized models, marginalize over the token boundary); deeper levels (the
token before that going on) are ignored.

Entries are read as bytes through the byte-level alphabet both tokenizers must share
(GPT-2's byte-to-unicode map, ``tokenizers``' ByteLevel); other tokenizer families get the
aligned draws only (``EntrySplits.usable`` is False).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

Entry = tuple[
    bytes, dict[int, int]
]  # an entry's bytes, {byte offset: student piece starting there}


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


class EntrySplits:
    """Each teacher vocabulary entry as bytes and the student's split of it, read per id once."""

    def __init__(self, teacher: Any, student: Any) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.usable = _byte_level(teacher) and _byte_level(student)
        self.to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        self.teacher = teacher
        self.model = student.backend_tokenizer.model if self.usable else None
        self.specials = set(getattr(teacher, "all_special_ids", []))
        self.cache: dict[int, Entry | None] = {}

    def entry(self, teacher_id: int) -> Entry | None:
        """The entry's bytes and where the student's split of it starts each piece; None for a
        special token or an entry outside the byte-level alphabet."""
        if teacher_id in self.cache:
            return self.cache[teacher_id]
        found = None
        token = self.teacher.convert_ids_to_tokens(teacher_id)
        if (
            self.usable
            and isinstance(token, str)
            and teacher_id not in self.specials
            and all(char in self.to_byte for char in token)
        ):
            starts, at = {}, 0
            for piece in self.model.tokenize(token):  # type: ignore[union-attr]
                starts[at] = piece.id
                at += len(piece.value)  # one alphabet character per byte
            if at == len(token):
                found = (bytes(self.to_byte[char] for char in token), starts)
        self.cache[teacher_id] = found
        return found

    def next_piece(self, teacher_id: int, seen: bytes) -> int | None:
        """The student token after ``seen`` in the entry, if the entry continues ``seen`` and
        the student's split of it has a boundary right after it."""
        entry = self.entry(teacher_id)
        if entry is None or len(entry[0]) <= len(seen) or not entry[0].startswith(seen):
            return None
        return entry[1].get(len(seen))

    def continuations(
        self,
        ids: np.ndarray,
        counts: np.ndarray,
        seen: bytes,
        known: tuple[int, float] | None = None,
    ) -> dict[int, float]:
        """{student token: mass} of the drawn entries that continue ``seen`` (``next_piece``),
        as shares of all the row's draws (not renormalized); ``known`` = (the realized entry,
        its exact probability) counts by that probability instead of by its draws."""
        total = float(counts.astype(np.float64).sum())
        mass: dict[int, float] = {}
        if total <= 0:
            return mass
        for teacher_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
            if count <= 0 or (known is not None and teacher_id == known[0]):
                continue
            piece = self.next_piece(int(teacher_id), seen)
            if piece is not None:
                mass[piece] = mass.get(piece, 0.0) + count / total
        if known is not None and (piece := self.next_piece(known[0], seen)) is not None:
            mass[piece] = mass.get(piece, 0.0) + known[1]
        return mass
