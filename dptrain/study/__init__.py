"""Stage 5, the study: a grid of K x n splits run as a sweep -> results -> report, and the
theory fitted to them that predicts the best split of a larger budget. `grid` (budgets,
splits, what the data can hold), `plan` (what a sweep would cost: --dry-run), `sweep` (running
the points), `results` (results.csv), `report` (figures and tables), `theory` (the error model
and its fits), `calibrate` (intervals and the held-out choice of predictor) and `predict`."""
