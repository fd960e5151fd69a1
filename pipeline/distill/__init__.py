"""Stage two: everything that turns a logit store into trained students.

The store loader and its epoch order, the distillation losses, the student and its training
state, evaluation, the recipe ``train_student`` and ``compare``. May import ``kdcache.storage``
and the helpers at the top of ``kdcache.pipeline``; never ``cache`` or ``search``.
"""
