"""What every ``segformer-fast`` subcommand shares: the help formatter, and ``--device``/``--threads`` with
the thread count and oversubscription check behind them. Imports nothing heavy, so ``--help`` stays fast."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that adds ``(default: X)`` only where X says something: not for
    ``None`` (the help text says what happens instead), not for a flag's ``False``, and never twice."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)
