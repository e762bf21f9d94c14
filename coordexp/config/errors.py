"""Config findings are reported all at once as one :class:`~coordexp.errors.ConfigError` (exit code 2)."""

from __future__ import annotations

from collections.abc import Sequence

from coordexp.errors import DOCS_HINT, ConfigError, exit_on_error

__all__ = ["DOCS_HINT", "ConfigError", "exit_on_config_error", "raise_if"]

#: Entry points print a ConfigError like every other user error (coordexp.errors.exit_on_error).
exit_on_config_error = exit_on_error


def raise_if(problems: Sequence[str], title: str = "Invalid coordexp config") -> None:
    if problems:
        raise ConfigError(problems, title)
