"""The ``l2l-scale`` command: a thin layer that parses options and calls the pipeline modules.

Each subcommand maps to one module. User errors (:class:`l2l_scale.errors.L2LError`) are printed on one line and
exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from l2l_scale.cli.parsers import EXIT_USER_ERROR, build_parser
from l2l_scale.errors import L2LError

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``l2l-scale`` console script."""
    # TensorFlow's C++ start-up chatter and tifffile's per-page warnings are noise next to our one-line errors.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    from l2l_scale.io.prov import command_line

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = command_line(argv)  # every step records it in its outputs' provenance
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except L2LError as exc:
        if args.debug:
            raise
        print(f"l2l-scale {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"l2l-scale {args.command}: interrupted", file=sys.stderr)
        return 130
