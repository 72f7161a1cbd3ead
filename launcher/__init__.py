"""launcher: a distributed PyTorch training launcher (Hydra + torchrun/Slurm; DDP, FSDP, pipelines).

Each folder serves one phase of a run; this top level is what users run or import:

    config/    what to run: the schema, argv + conf/ composed into one checked config
    launch/    where it runs: torchrun and Slurm front ends, process groups, the run directory, exits
    memory/    whether it fits: the estimate, pre-flight, OOM report, snapshots, micro_batch_size=auto
    parallel/  how the model is spread over devices: the ddp, fsdp and pipeline strategies, comm hooks
    train/     the loop and what it steps: optimizer, precision, data, checkpoints, stopping
    observe/   what a run shows: metrics.jsonl, loggers, timing, telemetry, profiler, reports
    after/     the trained model: loaded back, exported, served, generated from

`python -m launcher` is __main__.py (compose -> validate -> process group -> train -> tear down);
`python -m launcher.<estimate|report|export|serve|generate|run|slurm>` are a few lines each that call
into their folder. recipe.py is the Recipe protocol (all a recipe imports); errors.py holds
ConfigError, which every part raises for bad input (exit code 2).
"""

__version__ = "0.1.0"
