"""`python -m fastdino.torchrun ARGS` is `torchrun ARGS` (torch.distributed.run) with the ranks' exit code.

torchrun exits 1 whenever a rank exits non-zero: a run stopped cleanly by SIGTERM (every rank saves, then exits
143), a start refused with a usage error (2) and a crash all look alike to a scheduler. This launcher exits with
the code of the rank that ended first (a rank killed by signal N counts as 128 + N, as in a shell), and with 128 + N
when torchrun itself is stopped by signal N, which it forwards to the ranks (they save and stop, stop.py).
"""
import sys


def exit_code(returncode: int) -> int:
    """A process's exit status as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = exit_code(failure.exitcode)
        sys.stderr.write(f"fastdino.torchrun: rank {rank} ended first, with exit code {code}; "
                         f"{len(error.failures)} rank(s) exited non-zero\n")
        return code
    except SignalException as error:  # torchrun was signalled and has stopped the ranks
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
