"""Every command line's --help shows each option's default, and `python -m export --help` stays
light: it must not import torch or transformers (that took seconds before any help appeared)."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

# The modules a user runs with `python -m`, each with a main(argv) that builds its parser first.
# The last three import torch to build their parsers: the slow tier.
COMMAND_LINES = [
    "server.__main__", "server.prometheus_monitor", "patent_classifier_client.__main__", "export.__main__",
    "benchmarks.bench", "benchmarks.soak", "benchmarks.batching_comparison",
    *(pytest.param(name, marks=pytest.mark.model)
      for name in ("benchmarks.padding_simulation", "benchmarks.attention_parity", "benchmarks.gpu_gemma2_9b")),
]


class ParserBuilt(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``main`` builds, caught at its parse_args, before the command does anything."""
    def caught(self, *_args, **_kwargs):
        raise ParserBuilt(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    with pytest.raises(ParserBuilt) as built:
        importlib.import_module(module_name).main([])
    return built.value.parser


def with_subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                parsers += with_subcommands(sub)
    return parsers


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


@pytest.mark.parametrize("module_name", COMMAND_LINES)
def test_every_option_with_a_default_shows_it_in_help(module_name, monkeypatch):
    hidden = []
    for parser in with_subcommands(parser_of(module_name, monkeypatch)):
        for action in parser._actions:
            if not action.option_strings or action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            default = action.default
            if any(default is nothing for nothing in (None, False, argparse.SUPPRESS)):
                assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
                continue
            text = shown_help(parser, action)
            if f"default: {default}" not in text and not (default == [] and "default: none" in text):
                hidden.append(f"{parser.prog} {action.option_strings[0]} (default {default!r})")
    assert hidden == []


def test_export_help_imports_neither_torch_nor_transformers():
    shown = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "export", "--help"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0 and "usage: python -m export" in shown.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in shown.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported  # the import log is read as it should be
    assert imported.isdisjoint({"torch", "transformers", "peft", "safetensors", "vllm"}), sorted(imported & {"torch", "transformers"})
    for command in ("demo-models", "models", "verify", "demo-labelled-set"):
        sub = subprocess.run([sys.executable, "-m", "export", command, "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0 and "default" in sub.stdout, sub.stderr
