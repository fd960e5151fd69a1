"""The packer: examples → teacher inputs, with each position's training flag.

``concat`` lays a split's examples (each already ending with EOS) into one stream cut into
``seq_len`` sequences, the last one short; a sequence that does not start with BOS gets one first
when the tokenizer uses BOS, so every teacher input starts the way the tokenizer starts a text.
``separate`` lays one example per sequence; an example longer than ``seq_len`` becomes pieces,
each after the first starting with BOS. Position ``t`` is trained iff the token following it in
the example stream exists and is a label token (``separate``: within the example, into its next
piece; ``concat``: the next token of the stream, perhaps in the next sequence).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def pieces(
    ids: np.ndarray, fill: int, seq_len: int, bos_id: int | None
) -> Iterator[tuple[int, int, bool]]:
    """How ``ids`` (n,) are laid into sequences after an open one of ``fill`` tokens (0: none).

    Yields:
        (start, stop, bos) per sequence touched: ``ids[start:stop]`` go into it, after a BOS
        when ``bos`` (a new sequence whose first token would not be BOS).
    """
    p = 0
    while p < len(ids):
        bos = fill == 0 and bos_id is not None and ids[p] != bos_id
        stop = min(len(ids), p + seq_len - fill - bos)
        yield p, stop, bos
        fill = (fill + bos + stop - p) % seq_len
        p = stop


@dataclass
class PackedSequence:
    tokens: np.ndarray  # (L,) int32
    positions: np.ndarray  # (L,) bool: trained positions (the next token is a label token)
    first_document: int
    last_document: int
    token_bytes: np.ndarray | None = None  # (L,) int64: the bytes of ``text`` each token spells
    text: bytes | None = None  # the UTF-8 text the tokens spell (None: the tokenizer gave none)


class SequencePacker:
    """Lays examples into sequences incrementally (``concat`` or ``separate``), with each
    position's training flag and the documents each sequence spans.

    Args:
        eos_id: appended to every example by ``add`` (``pack_sequences``); None: the examples
            end with their EOS already.
        bos_id: put before a sequence that does not start with it; None: the tokenizer uses none.
    """

    def __init__(
        self,
        seq_len: int,
        eos_id: int | None = None,
        *,
        bos_id: int | None = None,
        separate: bool = False,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len, self.eos_id, self.bos_id, self.separate = seq_len, eos_id, bos_id, separate
        self._tokens: list[np.ndarray] = []  # the open sequence, in chunks: (k_i,) int32 ...
        self._positions: list[np.ndarray] = []  # ... and (k_i,) bool
        self._spans: list[tuple[np.ndarray, bytes] | None] = []  # ... and their text
        self._fill = 0  # tokens in the open sequence
        self._first = -1  # document of the open sequence's first token
        self._last = -1  # the latest document added
        self._held: PackedSequence | None = None  # complete; its last flag awaits the next token
        self._pending = False  # the last position laid awaits the next example's first label

    def add(
        self,
        ids: Sequence[int] | np.ndarray,
        document: int = -1,
        label_mask: np.ndarray | None = None,
        token_bytes: np.ndarray | None = None,
        text: bytes | None = None,
    ) -> list[PackedSequence]:
        """Lay one example: (n,) ids (+ EOS when ``eos_id`` is set) and its (n,) bool label
        mask (None: every token is a label), with the (n,) bytes of ``text`` each token spells
        (None: no text). Returns the sequences completed."""
        ids = np.asarray(ids, dtype=np.int32)
        labels = np.ones(len(ids), bool) if label_mask is None else np.asarray(label_mask, bool)
        ends = None if token_bytes is None or text is None else np.cumsum(token_bytes)
        if self.eos_id is not None:
            ids = np.concatenate([ids, np.asarray([self.eos_id], np.int32)])
            labels = np.concatenate([labels, labels[-1:] if len(labels) else [True]])
            ends = None if ends is None else np.append(ends, ends[-1] if len(ends) else 0)
        if not len(ids):
            return []
        done = self._resolve(bool(labels[0]))
        after = np.zeros(len(ids), bool)  # (n,) the next token of the example is a label
        after[:-1] = labels[1:]
        for start, stop, bos in pieces(ids, self._fill, self.seq_len, self.bos_id):
            if self._fill == 0:
                self._first = document
            if bos:
                nothing = (np.zeros(1, np.int64), b"") if ends is not None else None
                self._put(np.asarray([self.bos_id], np.int32), labels[start : start + 1], nothing)
            spans = None
            if ends is not None and text is not None:  # the bytes of tokens [start, stop)
                a = int(ends[start - 1]) if start else 0
                piece = ends[start:stop]
                spans = (np.diff(piece, prepend=a), text[a : int(piece[-1])])
            self._put(ids[start:stop], after[start:stop], spans)
            if self._fill == self.seq_len:
                done.append(self._close(document))
        self._last = document
        if self.separate:
            done.extend(self.finish())
        elif done and not self._fill:
            self._held = done.pop()
        self._pending = not self.separate
        return done

    def finish(self) -> list[PackedSequence]:
        """The sequences still open or held (the last one short, never empty)."""
        done = self._resolve(False)
        self._pending = False
        if self._fill:
            done.append(self._close(self._last))
        return done

    def _put(
        self, tokens: np.ndarray, positions: np.ndarray, spans: tuple[np.ndarray, bytes] | None
    ) -> None:
        self._tokens.append(tokens)
        self._positions.append(positions.copy())
        self._spans.append(spans)
        self._fill += len(tokens)

    def _close(self, document: int) -> PackedSequence:
        # copies: a view would keep a long document's whole arrays alive
        sequence = PackedSequence(
            np.concatenate(self._tokens), np.concatenate(self._positions), self._first, document
        )
        if all(spans is not None for spans in self._spans):
            parts = [spans for spans in self._spans if spans is not None]
            sequence.token_bytes = np.concatenate([lengths for lengths, _ in parts])
            sequence.text = b"".join(text for _, text in parts)
        self._tokens, self._positions, self._spans, self._fill = [], [], [], 0
        self._first = document
        return sequence

    def _resolve(self, next_label: bool) -> list[PackedSequence]:
        """Set the last laid position's flag now that the stream's next token is known."""
        if self._pending:
            if self._held is not None:
                self._held.positions[-1] = next_label
            elif self._positions:
                self._positions[-1][-1] = next_label
        held, self._held = self._held, None
        return [] if held is None else [held]


def pack_sequences(
    documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, eos_id: int
) -> Iterator[np.ndarray]:
    """Join documents with EOS and cut the stream into ``seq_len`` sequences (no BOS added).

    Each document is followed by one EOS. Every sequence but the last has exactly ``seq_len``
    tokens; the last holds the remainder (possibly short, never empty).

    Yields:
        int32 arrays of shape (seq_len,) — (r,) for the final remainder.
    """
    packer = SequencePacker(seq_len, eos_id)
    for ids in documents:
        for sequence in packer.add(ids):
            yield sequence.tokens
    for sequence in packer.finish():
        yield sequence.tokens
