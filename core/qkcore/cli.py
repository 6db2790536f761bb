"""The ``qkcore`` command line (click).

Every command comes from the ``qkcore_register_commands`` hook: the built-in ones
(``sniff``, ``push``, ``plan``, ``inspect``, ``plasticity``, ``plugins``) from the
core's own plugin, :mod:`qkcore.builtin`, and any other from an installed plugin.
Plugins are loaded the first time the commands are needed, so ``qkcore --version``
loads none; no module loaded for ``qkcore --help`` imports torch.

Exit status: 0 on success, 2 on an error the user can act on (one ``qkcore: error:``
line naming the key, file or row at fault; usage errors too), 130 when interrupted
(Ctrl-C or SIGTERM; the same command, without ``--restart``, resumes from the last commit).
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Sequence

import click
import pluggy

from qkcore import __version__
from qkcore.errors import QkcoreError

_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_RESUMES = "the same command resumes from the last commit"


def _resume_hint(args: Sequence[str]) -> str:
    """How to go on after a stop: the same command, but without ``--restart`` (it would discard the progress)."""
    if "--restart" in args:
        return "run the same command without --restart to resume from the last commit (--restart would discard it)"
    return _RESUMES


class QkcoreCli(click.Group):
    """The root ``qkcore`` group; its commands are registered through the plugin hook on first need."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        super().__init__(
            name="qkcore",
            help="Capture post-RoPE query/key vectors from Hugging Face models and publish them as a Parquet dataset.",
            context_settings=_SETTINGS,
            params=[click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True,
                                 callback=_show_version, help="print the version and exit")],
        )
        self._pm = pm
        self._registered = False

    def plugin_manager(self) -> pluggy.PluginManager:
        """The plugin manager (made on first use), with every plugin's commands added to this group."""
        if self._pm is None:
            from qkcore.plugins import make_plugin_manager

            self._pm = make_plugin_manager()
        if not self._registered:
            self._registered = True
            self._pm.hook.qkcore_register_commands(cli=self)
        return self._pm

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, sorted."""
        self._load(ctx)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command called ``cmd_name``, or None."""
        self._load(ctx)
        return super().get_command(ctx, cmd_name)

    def _load(self, ctx: click.Context) -> None:
        pm = self.plugin_manager()
        if ctx.obj is None:  # what `@click.pass_obj` hands a command
            ctx.obj = pm

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Add ``cmd``; a name another plugin already took is an error naming both."""
        name = name or cmd.name
        taken = self.commands.get(name or "")
        if taken is not None:
            from qkcore.plugins import clash_error

            raise clash_error("command", name or "", _origin(taken), _origin(cmd))
        super().add_command(cmd, name)


def _origin(command: click.Command) -> str:
    return getattr(command.callback, "__module__", None) or type(command).__name__


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"qkcore {__version__}")
        ctx.exit()


def main(argv: Sequence[str] | None = None, *, pm: pluggy.PluginManager | None = None) -> int:
    """Entry point of the ``qkcore`` script; returns the exit status.

    ``argv`` defaults to ``sys.argv[1:]``; ``pm`` (default: a new one with every
    installed plugin) is the plugin manager the commands run with.
    """
    from qkcore.logs import configure_logging

    configure_logging()
    cli = QkcoreCli(pm)
    args = list(sys.argv[1:] if argv is None else argv)
    previous = _terminate_like_interrupt()
    try:
        with cli.make_context("qkcore", args) as ctx:
            cli.invoke(ctx)
        return 0
    except click.exceptions.Exit as exc:  # --help, --version, or a command's ctx.exit(code)
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # `qkcore` or `qkcore plugins` alone
        return _error(f"{_where(exc.ctx)}missing command (see '{exc.ctx.command_path} --help')")
    except click.UsageError as exc:  # unknown option, missing or bad value: one line, like every user error
        message = " ".join(exc.format_message().split()).rstrip(".")
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _error(f"{_where(exc.ctx)}{message}{hint}")
    except click.ClickException as exc:  # a plugin command's own user error
        return _error(exc.format_message())
    except (KeyboardInterrupt, click.exceptions.Abort):
        print(f"qkcore: error: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permissions, a vanished mount: the environment, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(f"{where}{exc.strerror or exc}; once this is fixed, {_resume_hint(args)}")
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        return _error(str(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> int:
    """Print one ``qkcore: error:`` line; return exit status 2.

    A message of several lines (several bad keys, a library's text quoted as the cause) is
    joined with ``"; "``: the user sees one line, and a log collector one record.
    """
    print(f"qkcore: error: {one_line(message)}", file=sys.stderr)
    return 2


def one_line(message: str) -> str:
    """``message`` with its lines (blank ones dropped, each stripped) joined by ``"; "``."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _is_user_error(exc: Exception) -> bool:
    """A QkcoreError or a ConfigError (looked up only if qkcore.config was imported: then only can one exist)."""
    config = sys.modules.get("qkcore.config")
    return isinstance(exc, QkcoreError) or (config is not None and isinstance(exc, config.ConfigError))


def _where(ctx: click.Context | None) -> str:
    """``"sniff: "`` for an error in a subcommand, nothing for the root."""
    sub = ctx.command_path.partition(" ")[2] if ctx is not None else ""
    return f"{sub}: " if sub else ""


def _terminate_like_interrupt() -> Any:
    """Make SIGTERM (what schedulers send before killing a job) stop a run as cleanly as Ctrl-C does."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
