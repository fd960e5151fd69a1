"""How each sweep candidate reads the store: in the store's tokens, or re-tokenized for a student
with its own tokenizer (``tokenizer:`` in the sweep YAML; ``cross_tokenizer.py``).

Candidates that read alike share a group (one stream of batches feeds the whole group), so the
groups of ``--together`` are planned per reading; a candidate's loss is resolved for its reading
(``auto`` → the store's loss, or chunk likelihood matching for a student with its own tokenizer),
and its leaderboard row names its tokenizer, which ranks the sweep by bits per byte when they
differ (``leaderboard.ranking_metric``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kdcache.pipeline.distill.checks import check_store
from kdcache.pipeline.distill.student import load_store_tokenizer
from kdcache.pipeline.distill.student_tokenizer import check_encodes, cross_loss, cross_student
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.sweep_config import STORE_TOKENIZER, Candidate, SweepConfig


@dataclass
class Reading:
    """One way to read the store: the tokenizer students are built on and saved with, the
    collator of a student with its own tokenizer (None: the store's tokens), the logits' ids."""

    tokenizer: Any
    cross: Any
    vocab: int

    @property
    def pad_id(self) -> int:
        if self.cross is not None:
            return int(self.cross.pad_id)
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0


class Readings:
    """Each candidate's ``Reading``, built once per tokenizer (the store's, or a directory), and
    its loss resolved for that reading; ``notes`` gathers what to print (unknown tokens a
    student's tokenizer met). Candidates that read alike get the same ``Reading`` object."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.by_spec: dict[str, Reading] = {}
        self.notes: list[str] = []

    def of(self, candidate: Candidate) -> tuple[Reading, Candidate]:
        """``candidate``'s reading and the candidate with its loss resolved.

        Raises:
            UserError: naming the candidate: a loss its reading cannot train, a store without
                the text a student with its own tokenizer needs, a tokenizer that cannot
                encode it.
        """
        store, spec = self.store, candidate.tokenizer  # a directory, or "store"
        try:
            cross = None
            if spec != STORE_TOKENIZER:
                cross = cross_student(spec, store, candidate.loss, online=False)
            if cross is None:
                loss = check_store(
                    store, candidate.loss, temperature=candidate.temperature,
                    candidate=candidate.name,
                )  # fmt: skip
                key = "store"
            else:
                key = spec
                if key not in self.by_spec:
                    note = check_encodes(store, cross)  # a probe: unknown and aligned tokens
                    if note:
                        self.notes.append(f"{candidate.name}: {note}")
                    self.by_spec[key] = Reading(cross.tokenizer, cross, len(cross.tokenizer))
                loss = cross_loss(candidate.loss, store, self.by_spec[key].cross)
        except UserError as e:
            raise UserError(f"candidate {candidate.name}: {e.message}") from e
        if key not in self.by_spec:
            self.by_spec[key] = Reading(load_store_tokenizer(store), None, store.tokenizer_size)
        return self.by_spec[key], replace(candidate, loss=loss)


def candidate_readings(
    config: SweepConfig, store: Any
) -> tuple[dict[str, Reading], list[Candidate], list[str]]:
    """Each listed candidate's ``Reading`` (by name), the candidates with their losses
    resolved, and the notes to print (``Readings.of`` for each).

    Raises:
        UserError: as ``Readings.of``.
    """
    cache = Readings(store)
    readings: dict[str, Reading] = {}
    resolved: list[Candidate] = []
    for candidate in config.candidates:
        readings[candidate.name], candidate = cache.of(candidate)
        resolved.append(candidate)
    return readings, resolved, cache.notes


def plan_groups(
    todo: list[Candidate], readings: dict[str, Reading], together: int
) -> list[list[Candidate]]:
    """Groups of at most ``together`` candidates that read the store alike, in YAML order of
    their first candidate."""
    by_reading: dict[int, list[Candidate]] = {}
    for candidate in todo:
        by_reading.setdefault(id(readings[candidate.name]), []).append(candidate)
    groups = []
    for members in by_reading.values():
        groups += [members[i : i + together] for i in range(0, len(members), together)]
    return groups
