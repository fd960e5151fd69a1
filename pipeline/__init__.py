"""kdcache.pipeline — the product's commands, one package per stage (docs/architecture.md).

- ``cache/``: stage one, a teacher and a corpus → a logit store (``kdcache cache-teacher``,
  ``kdcache build-teacher``).
- ``distill/``: stage two, a logit store → trained students (``kdcache train-student``,
  ``kdcache compare``).
- ``search/``: the architecture search, many students from one store (``kdcache sweep``).
- here: the CLI (``cli.py``, ``__main__.py``), ``verify``/``inspect`` (``store_commands.py``),
  ``ls`` (``catalog.py``) and helpers every stage may use: ``errors``, ``files``,
  ``host_memory``, ``teacher``, ``logit_head``, ``precision``, ``progress``.

Imports: ``cache`` and ``distill`` never import each other; ``search`` builds on ``distill``;
everything may import ``kdcache.storage`` and the helpers here; only ``cli.py`` imports a
recipe module (``cache_teacher``, ``default_teacher``, ``train_student``, ``compare``, ``sweep``).
"""
