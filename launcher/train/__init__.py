"""The training loop and what it steps, whatever the parallel strategy.

loop.py                      `train()` and `Trainer`: optimizer steps, logging, evaluation, saving
build.py                     the Trainer's parts, one factory each, in the order that matters
state.py                     what a checkpoint holds for one rank, and how to put it back
checkpoint.py                atomic, verified checkpoints; the resume choice; keep-last-k
sharded_checkpoint.py        model and optimizer state with torch.distributed.checkpoint (FSDP)
checkpoint_files.py          what both formats share: CheckpointError, sha256, fsync
data.py                      sharded, seeded, resumable data streams
optim.py                     optimizer and learning-rate schedule
precision.py                 autocast, fp16 loss scaling; fp8.py: torchao float8 Linears
activation_checkpointing.py  each block recomputed in backward
shutdown.py                  a signal -> a checkpoint at the next step boundary, then exit; watchdog
nonfinite_guard.py           non-finite steps dropped on the device, without a host sync
"""
