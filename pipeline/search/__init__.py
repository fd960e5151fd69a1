"""The architecture search: many students trained from one store, ranked (``kdcache sweep``).

The sweep YAML and its candidates, the recipe ``sweep`` and the leaderboard. Builds on stage two
(``kdcache.pipeline.distill``'s loader, trainee and evaluation); never imports ``cache``.
"""
