"""Loaded at interpreter start (PYTHONPATH): in a torchrun worker, make tearing down a process group
block forever, as gloo's teardown sometimes does. No exit path of a rank may depend on it returning."""

import os

if "RANK" in os.environ:
    import time

    import torch.distributed

    def _blocks_forever(*args, **kwargs):
        while True:
            time.sleep(60)

    torch.distributed.destroy_process_group = _blocks_forever
