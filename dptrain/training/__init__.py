"""Stage 3, training: batches -> a pre-trained checkpoint. `config` (the options and recipes),
`optimizers` (the --optimizer table), `models` (by name), `device` (device, autocast, the
model's input), `train` (set-up, the loop, the summary), `meter` (what the loop measures and
logs) and `stopping` (a signal stops a run at its next step, with a checkpoint)."""
