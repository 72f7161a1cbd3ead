"""After training: the model rebuilt from a run directory or an export, then exported or served.

trained.py   a trained model back from a run directory (any parallel layout) or an export
export.py    `python -m launcher.export`: prune, quantize, measure, write an export directory
quantize.py  int8 quantization of Linear layers: applied by export, rebuilt by trained.py
serve/       `python -m launcher.serve`: requests batched into the model over HTTP
generate.py  `python -m launcher.generate`: the same engine and batches, offline

Nothing in train/ imports from here: training does not depend on inference.
"""
