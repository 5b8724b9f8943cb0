"""The help text of every command line in the project (``python -m server``, ``clients``, ``export``,
``benchmarks.*``): the module docstring as written, and each option's default beside its help."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``argparse.ArgumentDefaultsHelpFormatter`` without its "(default: None)" and "(default:
    False)": an option with no value of its own says in its help what happens without it, and a
    flag is off unless given. A help text that speaks of its default itself is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (
            text and text is not argparse.SUPPRESS and action.option_strings and "default" not in text
            and not any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
        ):
            text += " (default: %(default)s)"
        return text
