"""Seeing a run: while it trains (metrics, loggers, timing, telemetry, profiler) and afterwards (reports).

metrics.py    metrics.jsonl, FLOPs and MFU, device memory
loggers.py    the console (rank 0, a progress bar), wandb, TensorBoard; log lines carry the rank
timing.py     how long a step takes and where its time goes (time_*_s on log steps)
telemetry.py  GPU telemetry from NVML, every rank's, on log steps
profile.py    named ranges over the loop's phases; torch.profiler windows; NVTX
starts.py     starts.jsonl: one line per start of training (restarts, requeues)
summary.py    the model line and the run summary in the log; a sweep's table
report.py     `python -m launcher.report`: PNGs and report.md from run directories
"""
