"""The `gradwatch` command: one entry point, each subcommand implemented in the module that owns it.

Subcommands import their module lazily, so `gradwatch sync` and `gradwatch replay` work on a client-only
install and `gradwatch serve` only needs the `server` extra when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, help). Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gradwatch_service.cli.serve", "run the gradwatch service"),
    "db": ("gradwatch_service.cli.db", "manage the service's database schema (upgrade, downgrade, current)"),
    "token": ("gradwatch_service.cli.token", "make, list and revoke the service's API tokens (on its database)"),
    "sync": ("gradwatch.sync", "upload steps a finished job left in its spool"),
    "replay": ("gradwatch.replay", "run the detectors over trace files and write alerts"),
    "runs": ("gradwatch.cli_runs", "list runs with their latest loss, gradient norm and open incidents"),
    "show": ("gradwatch.cli_show", "one run: summary, incidents, sparklines of loss and gradient norm"),
    "tail": ("gradwatch.cli_tail", "follow a run's new steps and incidents live"),
    "export": ("gradwatch.cli_export", "write a run as a trace file (JSON lines or CSV)"),
    "import": ("gradwatch.cli_import", "send a trace file to the service as a run, through its detectors"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                parser.exit(2, f"gradwatch {name}: {exc}. Install the extra it needs, e.g. "
                               f"pip install 'gradwatch[server]'.\n")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
