"""The command line: ``advisor <subcommand>``, one module per subcommand.

``main(argv)`` returns the exit status: 0 done, 2 bad input (one line, no traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from advisor import logs
from advisor.errors import AdvisorError
from advisor.files import CACHE_DIR
from advisor.version import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise AdvisorError(f"{message} (see '{self.prog} --help')")


def parser() -> argparse.ArgumentParser:
    from advisor.cli import apply, bench, dashboard, export, run, show, studies

    p = _Parser(prog="advisor", description="Measure which PyTorch optimization techniques "
                "to use for your model on this hardware.")
    p.add_argument("--version", action="version", version=f"advisor {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (run, show, dashboard, studies, export, apply, bench):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        p = parser()
        args = p.parse_args(argv)
        if args.command is None:
            p.print_help()
            return 2
        log = Path(getattr(args, "cache_dir", None) or CACHE_DIR).absolute() / "libraries.log"
        os.environ[logs.ENV] = str(log)  # for the fork server trial processes start from
        logs.quiet_libraries(log)
        return args.handler(args)
    except AdvisorError as exc:
        print(f"advisor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advisor: interrupted", file=sys.stderr)
        return 130
