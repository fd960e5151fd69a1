"""kdcache pipeline: the two recipes (cache-teacher, train-student) and their building blocks."""
