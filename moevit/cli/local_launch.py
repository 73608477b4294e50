"""`python -m moevit.cli.local_launch TORCHRUN_ARGS`: torchrun for `--nproc N`, exiting with the workers' code.

torchrun itself turns any failed worker into a ChildFailedError traceback and exit 1, so a worker's
`moevit: error: ...` (exit 2) or a non-finite stop (exit 3) would reach the user as a traceback with the
wrong code. This runs torchrun's own launcher and, when a worker fails, exits with the code of the
first worker that failed (128 + N for one killed by signal N, as a shell reports it), printing nothing
more: the worker has already said what went wrong.
"""

from __future__ import annotations

import sys


def exit_code_of_failure(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return exit_code_of_failure(failure.exitcode) or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
