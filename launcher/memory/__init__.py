"""GPU memory: predicted before launch (estimate, preflight), recorded (snapshots) and explained (oom).

`python -m launcher.estimate` (estimate_cli.py) prints the estimate; training calls preflight before
building the model and the OOM report when CUDA runs out of memory; autobatch.py resolves
`train.micro_batch_size=auto` and `train.activation_checkpointing=auto` from the estimate.
"""
