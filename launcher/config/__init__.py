"""What to run: the config schema, and the one way from argv to a checked config.

schema.py    the dataclasses registered in Hydra's ConfigStore: one per config group, a docstring per field
cli.py       argv -> Hydra composition over conf/ -> checked `Job`s (also help, `--cfg`, sweeps)
validate.py  value and combination checks, run once before any process group (each part's own
             `check_*` is called from here)
auto.py      what `auto` settings resolve to (`train.compile`; `micro_batch_size=auto`: memory/autobatch.py)
"""
