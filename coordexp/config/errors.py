"""One error type for every bad-config finding, reported all at once."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

DOCS_HINT = "Config reference: docs/config.md"


class ConfigError(ValueError):
    """A config is invalid; ``problems`` holds one line per finding (dotted path first)."""

    def __init__(self, problems: Sequence[str], title: str = "Invalid coordexp config"):
        self.problems = list(problems)
        self.title = title
        n = len(self.problems)
        lines = [f"{title} ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(DOCS_HINT)
        super().__init__("\n".join(lines))


def raise_if(problems: Sequence[str], title: str = "Invalid coordexp config") -> None:
    if problems:
        raise ConfigError(problems, title)


@contextlib.contextmanager
def exit_on_config_error(exit_code: int = 2) -> Iterator[None]:
    """Print a ConfigError as one screen of text and exit non-zero (traceback only with
    HYDRA_FULL_ERROR=1)."""
    try:
        yield
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(exit_code)
