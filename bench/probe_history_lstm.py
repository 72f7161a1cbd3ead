"""Which allocator-history settings a checkpointed cuDNN LSTM survives, each in its own process.

    python3 bench/probe_history_lstm.py    # on a CUDA machine; one line per setting

On torch 2.11 (H100) recording the stacks of frees (`context="all"`, torch's default) makes
`_VF.lstm` fail with "returned NULL without setting an exception"; launcher/memory/snapshot.py
records with `context="alloc"` for that reason.
"""

import subprocess
import sys

CHILD = r"""
import sys, torch
from torch.utils.checkpoint import checkpoint
context, stacks = sys.argv[1], sys.argv[2]
if context != "off":
    torch.cuda.memory._record_memory_history(context=None if context == "none" else context, stacks=stacks)
lstm = torch.nn.LSTM(512, 512, batch_first=True).cuda()
x = torch.randn(8, 64, 512, device="cuda", requires_grad=True)
for ac in (False, True):
    out = checkpoint(lambda t: lstm(t)[0], x, use_reentrant=False) if ac else lstm(x)[0]
    out.sum().backward()
torch.cuda.synchronize()
print("ok")
"""
SETTINGS = [("off", "-"), ("all", "all"), ("all", "python"), ("alloc", "all"), ("alloc", "python")]


def main() -> None:
    for context, stacks in SETTINGS:
        run = subprocess.run(
            [sys.executable, "-c", CHILD, context, stacks], capture_output=True, text=True, timeout=120
        )
        last = (run.stdout + run.stderr).strip().splitlines()[-1:] or [""]
        print(f"context={context:6s} stacks={stacks:7s} exit {run.returncode}: {last[0][:160]}", flush=True)


if __name__ == "__main__":
    main()
