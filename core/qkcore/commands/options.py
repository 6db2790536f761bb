"""What several commands share: the run-configuration options and loading the configuration."""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import click

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.config import SniffConfig

F = TypeVar("F", bound=Callable[..., Any])


def config_options(command: F) -> F:
    """Declare ``--config FILE`` (required) and ``--set KEY=VALUE`` (repeatable, as ``overrides``)."""
    command = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="override a config key, e.g. --set capture.sampler.type=all (repeatable)",
    )(command)
    return click.option("--config", required=True, metavar="FILE", help="run configuration (YAML)")(command)


def load_run_config(path: str, overrides: tuple[str, ...] | list[str]) -> SniffConfig:
    """Load and validate the run configuration; each config warning prints as one ``qkcore: warning:`` line."""
    from qkcore.config import QkcoreConfigWarning, load_config

    with warnings.catch_warnings():
        warnings.simplefilter("always", QkcoreConfigWarning)
        warnings.showwarning = _show_config_warning
        return load_config(path, overrides=list(overrides))


def _show_config_warning(message: Any, category: Any, filename: Any, lineno: Any, file: Any = None, line: Any = None) -> None:
    print(f"qkcore: warning: {message}", file=sys.stderr)


class DeferredOptions(click.Command):
    """A command whose ``declare()`` options are made the first time it parses or shows help.

    ``qkcore --help`` lists each command by its one-line help only. Options whose
    defaults live in a heavy module (``qkcore.estimate`` imports torch) are declared by a
    function that imports them then, so the defaults keep one home and listing the
    commands imports nothing heavy.
    """

    def __init__(self, *args: Any, declare: Callable[[], list[click.Parameter]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._declare: Callable[[], list[click.Parameter]] | None = declare

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        """Every parameter, declaring the deferred ones on first use."""
        if self._declare is not None:
            self.params.extend(self._declare())
            self._declare = None
        return super().get_params(ctx)
