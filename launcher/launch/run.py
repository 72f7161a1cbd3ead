"""python -m launcher.run: torchrun for the launcher, exiting with the launcher's exit code.

    python -m launcher.run --standalone --nproc_per_node=2 recipe=gpt parallel=ddp train.steps=1000
    python -m launcher.run --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=host:29500 ...

torchrun's own flags (its parser) come first; from the first word torchrun does not know, everything is
the launcher's (`-m launcher` is implied). It is torchrun's launch API (`torch.distributed.run.run`),
restarts and signal forwarding included; only the ending differs. torchrun exits 1 whenever a worker
fails, under a ChildFailedError traceback; this prints one line per failed rank and exits with the code
of the failure that caused the others: 2 invalid configuration, 3 non-finite loss, 4 out of GPU memory,
6 disk full, 128+N stopped by signal N, 1 anything else (launcher/launch/exits.py). `torchrun -m launcher`
works as before.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from launcher.launch import exits

# torchrun flags that would change what is launched: the launcher is always `python -m launcher`.
NOT_PASSED = {"-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path", "-h", "--help"}
USAGE = "usage: python -m launcher.run [torchrun options] [launcher overrides and options]"


def split_argv(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(torchrun's options, the launcher's arguments): torchrun's end at the first word it does not
    know, so the launcher's own `-m` (a sweep) or `--cfg job` stay the launcher's."""
    options = parser._option_string_actions  # noqa: SLF001 - argparse keeps no public map of flags
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if not arg.startswith("--") and len(arg) > 2:  # -r3, -t3: a short flag with its value attached
            name = arg[:2] if arg[:2] in options and arg[2:3] != "=" else name
        action = options.get(name)
        if action is None or name in NOT_PASSED:
            break
        i += 1
        if action.nargs != 0 and name == arg and i < len(argv):
            i += 1  # its value, as the next word
    return argv[:i], argv[i:]


def root_cause(failures: Mapping[int, object]) -> tuple[int, object]:
    """The failure that caused the others: torchrun ends every worker once one fails, so the list mixes
    the cause with its echoes. In order: a code the launcher chose (2 config, 3, 4, 6...), a rank's own
    exception (it left an error file), a rank killed by a signal other than torchrun's closing SIGTERM
    (kill -9), a plain 1 ("a collective failed": a peer died or hung), and last a signal stop (128+N) or
    SIGTERM death, which is what torchrun's SIGTERM to the survivors makes of them (a hung rank ends
    143 by its watchdog). Then the earliest, then the lowest rank. A stop that every rank made alike
    has one code anyway."""

    def rank_of(item: tuple[int, object]) -> tuple[int, int, int]:
        rank, failure = item
        code = failure.exitcode
        if 1 < code < 128:
            order = 0
        elif _traceback(failure):
            order = 1
        elif code < 0 and -code != 15:
            order = 2
        elif code == 1:
            order = 3
        else:
            order = 4
        return order, failure.timestamp, rank

    return min(failures.items(), key=rank_of)


def exit_code(code: int) -> int:
    """A worker's exit as a shell would report it: killed by signal N -> 128 + N."""
    return 128 - code if code < 0 else code


def report(failures: Mapping[int, object]) -> int:
    """One line per failed rank, the cause's traceback if it left one; returns the cause's code."""
    cause_rank, cause = root_cause(failures)
    traceback = _traceback(cause)
    if traceback:
        print(f"launcher.run: rank {cause_rank}'s traceback:\n{traceback.rstrip()}", file=sys.stderr)
    for rank, failure in sorted(failures.items()):
        code = exit_code(failure.exitcode)
        mark = " <- the cause" if rank == cause_rank and len(failures) > 1 else ""
        print(
            f"launcher.run: rank {rank} (pid {failure.pid}) exited with {code}: "
            f"{exits.describe(failure.exitcode)}{mark}",
            file=sys.stderr,
        )
    return exit_code(cause.exitcode)


def _traceback(failure: object) -> str | None:
    """What the rank's ErrorHandler.record_exception wrote (launcher/__main__.py: its own error)."""
    message = (failure.error_file_data or {}).get("message")
    if isinstance(message, dict):
        return (message.get("extraInfo") or {}).get("py_callstack")
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__.strip()}\n\ntorchrun options:\n{parser.format_help()}")
        return exits.OK
    ours, theirs = split_argv(argv, parser)
    args = parser.parse_args([*ours, "-m", "launcher", *theirs])
    os.environ[exits.RUN_ENV] = "1"  # the workers' messages name this command, not torchrun
    try:
        torchrun(args)
    except ChildFailedError as err:
        return report(err.failures)
    except SignalException as err:  # torchrun was signalled; its workers were asked to stop
        print(f"launcher.run: stopped by {err.sigval.name}; the workers were asked to stop", file=sys.stderr)
        return 128 + int(err.sigval)
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
