"""Stage 4, probing: a checkpoint -> cached features -> linear-probe top-1 on downstream sets.
`downstream` (the sets and the probe's options), `probe` (features and their cache, the
command) and `logreg` (the probe's solver)."""
