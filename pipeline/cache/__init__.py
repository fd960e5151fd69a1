"""Stage one: everything that turns a teacher and a corpus into a logit store.

Corpus reading and packing, the exact chunked targets (top-k with its tail mass, and samples
drawn deterministically per position), the reader/writer threads, the recipe ``cache_teacher``
and the embedded default teacher (``default_teacher``; ``teacher_finetune`` tunes a teacher on a
corpus' training split). May import ``kdcache.storage`` and the helpers at the top of
``kdcache.pipeline``; never ``distill`` or ``search``.
"""
