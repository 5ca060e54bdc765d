"""The common ground every stage stands on: run and sweep folders (`runfolder`: layout, locks,
atomic writes, checkpoints), `errors` (what a user sees when something fails, and the exit
status), `options` (an option declared once, as a dataclass field), `progress` (bars),
`environment` (torchrun's variables, the cores a process may use), `launch` (`--gpus`:
torchrun; a sweep's children die with it) and `tracking` (TensorBoard, W&B)."""
