"""The `imgindex` command: one parser for every command (jobs/arguments.py), each command run by its own module."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from jobs.arguments import exit_process, run_main


def dispatch(args: argparse.Namespace) -> int:
    """Run one parsed command; returns the exit status."""
    # Each command imports only what it uses: start-up time counts on small jobs.
    if args.command == "run":
        from jobs.run import main
    elif args.command == "embed":
        from jobs.embed import main
    elif args.command == "index":
        from jobs.index import main
    elif args.command == "cluster":
        from jobs.cluster import main
    elif args.command == "duplicates":
        from jobs.duplicates import main
    elif args.command == "query":
        from jobs.query import main
    elif args.command == "report":
        from jobs.report import main
    elif args.command == "serve":
        from jobs.serve import main
    else:
        from jobs.demo import main
    return main(args)


def main(argv: Sequence[str] | None = None) -> int:
    """`imgindex ARGS` in this process: parse, run, and turn a UserError into one line on stderr and exit status 2."""
    return run_main(argv, dispatch)


def entry(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry (`imgindex`): run `main`, then end the process (see `jobs.arguments.exit_process`)."""
    exit_process(main(argv))


if __name__ == "__main__":
    entry()
