"""GPU memory: predicted before launch (estimate, preflight), recorded (snapshots) and explained (oom).

`python -m launcher.estimate` prints the estimate; training calls preflight before building the model
and the OOM report when CUDA runs out of memory.
"""
