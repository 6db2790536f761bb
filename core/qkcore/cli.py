"""The ``qkcore`` command line: ``sniff``, ``push``, ``plan``, ``inspect``, ``plugins list`` and one subcommand per analysis.

Exit status: 0 on success, 2 on an error the user can act on (one ``qkcore: error:``
line naming the key, file or row at fault), 130 when interrupted (Ctrl-C or SIGTERM;
the same command resumes from the last commit).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from typing import Any, Sequence

from qkcore import ENTRY_POINT_GROUP, __version__
from qkcore.config import ConfigError, QkcoreConfigWarning, load_config
from qkcore.errors import QkcoreError
from qkcore.logs import configure_logging
from qkcore.inspect_data import InspectCommand
from qkcore.plan import PlanCommand
from qkcore.plugins import list_plugins, make_plugin_manager


def build_parser(commands_by_name: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkcore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qkcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    sniff = commands.add_parser("sniff", help="capture sampled Q/K rows and write the dataset")
    sniff.add_argument("--config", required=True, help="run configuration (YAML)")
    sniff.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set capture.sampler.type=all (repeatable)",
    )
    sniff.add_argument("--debug", action="store_true", help="debug logging (a line per batch)")
    sniff.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress line")
    sniff.add_argument("--json-logs", action="store_true", help="log lines as JSON objects, no progress line")
    sniff.add_argument(
        "--restart", action="store_true",
        help="discard the data root's staged progress (of this or another run) and capture from the start",
    )
    sniff.add_argument(
        "--replace", action="store_true",
        help="let this run replace the different run (or foreign files) the data root or Hub branch holds, "
             "when it finishes",
    )

    push = commands.add_parser("push", help="upload a finished data root to its Hub branch (retry after a failed push)")
    push.add_argument("--config", required=True, help="the run configuration that wrote the data")
    push.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    push.add_argument("--replace", action="store_true", help="replace a different run the Hub branch holds")

    plugins = commands.add_parser("plugins", help="installed model-family plugins")
    plugins_commands = plugins.add_subparsers(dest="plugins_command", required=True)
    plugins_commands.add_parser("list", help="name, package, version and model types of each plugin")

    for name, command in sorted(commands_by_name.items()):
        sub = commands.add_parser(name, help=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qkcore`` script; returns the exit status."""
    configure_logging()
    try:
        pm = make_plugin_manager()
    except QkcoreError as exc:  # a broken plugin install: say which, without a traceback
        print(f"qkcore: error: {exc}", file=sys.stderr)
        return 2
    # Know-before-you-spend commands, then every analysis a plugin provides.
    extra: dict = {"plan": PlanCommand(pm), "inspect": InspectCommand()}
    for provided in pm.hook.qkcore_analyses():
        extra.update(provided or {})
    args = build_parser(extra).parse_args(argv)
    configure_logging(debug=getattr(args, "debug", False), quiet=getattr(args, "quiet", False),
                      json=getattr(args, "json_logs", False))
    previous = _terminate_like_interrupt()
    try:
        if args.command == "sniff":
            return _sniff(args, pm)
        if args.command == "push":
            return _push(args)
        if args.command == "plugins":
            return _plugins_list(pm)
        return int(extra[args.command].run(args) or 0)
    except (ConfigError, QkcoreError) as exc:
        print(f"qkcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkcore: error: interrupted; the same command resumes from the last commit", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permissions, a vanished mount: the environment, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"qkcore: error: {where}{exc.strerror or exc}; the same command resumes from the last commit "
              "once this is fixed", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_like_interrupt() -> Any:
    """Make SIGTERM (what schedulers send before killing a job) stop a run as cleanly as Ctrl-C does."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        return None


def _sniff(args: argparse.Namespace, pm) -> int:
    from qkcore.sniff import run_sniff

    cfg = _load(args)
    if cfg.inference.debug_logging:  # the original tool's switch for verbose logs
        configure_logging(debug=True, quiet=args.quiet, json=args.json_logs)
    run_sniff(cfg, pm, restart=args.restart, replace=args.replace)
    return 0


def _push(args: argparse.Namespace) -> int:
    from qkcore.sniff import run_push

    run_push(_load(args), replace=args.replace)
    return 0


def _load(args: argparse.Namespace):
    with warnings.catch_warnings():
        warnings.simplefilter("always", QkcoreConfigWarning)
        warnings.showwarning = _show_config_warning
        return load_config(args.config, overrides=args.overrides)


def _show_config_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"qkcore: warning: {message}", file=sys.stderr)


def _plugins_list(pm) -> int:
    rows = [("NAME", "PACKAGE", "VERSION", "MODEL TYPES")]
    for info in list_plugins(pm):
        types = ", ".join(info.model_types) if info.model_types else ("(built-in)" if info.builtin else "-")
        rows.append((info.name, info.package, info.version, types))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    print(f"\nPlugins register under the entry-point group '{ENTRY_POINT_GROUP}'.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
