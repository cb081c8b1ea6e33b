"""The README as a user reads it: every `python <script>.py ...` command in its shell blocks uses only flags that
the script's argument parser defines (with a value where the flag takes one, none where it takes none), the
README stays short and free of internal references, and docs/cli.md names every flag of every script and no
flag that does not exist. The parsers are built in-process, without running any script."""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
MAX_README_LINES = 300
PYTHONS = {"python", "python3", ".venv/bin/python", "python3.11"}
SCRIPTS = ("run_glue", "train_gate", "train_gate_new", "export_subnet", "augment_data", "reproduce", "plot_tradeoff",
           "inference_sweep", "compare_strategies")


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


def _capture(self, args=None, namespace=None):
    raise _Captured(self)


@functools.cache
def script_parsers(script: str) -> tuple[argparse.ArgumentParser, ...]:
    """The parser(s) a script builds, without running it: its `*_parser()` functions, then whatever its
    `parse_args()` (else `main()`) builds, caught at the moment it would parse the command line."""
    module = importlib.import_module(script)
    builders = [fn for name, fn in vars(module).items()
                if name.endswith("parser") and inspect.isfunction(fn)
                and all(p.default is not p.empty for p in inspect.signature(fn).parameters.values())]
    parsers = [build() for build in builders]
    parsers = [p for p in parsers if isinstance(p, argparse.ArgumentParser)]
    parse_args = getattr(module, "parse_args", None)
    build_and_parse = (lambda: parse_args([])) if callable(parse_args) else None if parsers else module.main
    if build_and_parse is not None:
        original = argparse.ArgumentParser.parse_known_args
        argparse.ArgumentParser.parse_known_args = _capture  # parse_args() calls it: stop there, keep the parser
        try:
            build_and_parse()
        except _Captured as captured:
            parsers.append(captured.parser)
        finally:
            argparse.ArgumentParser.parse_known_args = original
    assert parsers, f"{script}.py: no argument parser found"
    return tuple(parsers)


def _options(parsers: tuple[argparse.ArgumentParser, ...]) -> dict[str, argparse.Action]:
    return {flag: action for p in parsers for flag, action in p._option_string_actions.items()}


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, flags=re.M | re.S)


def python_commands(block: str) -> list[tuple[str, list[str]]]:
    """(script name, arguments) of every `python <script>.py ...` in a shell block: continuation lines
    joined, comments dropped, `VAR="..."` assignments expanded where `$VAR` is used, commands split at
    `;`, `&&`, `||` and `|`."""
    text = block.replace("\\\n", " ")
    variables = {}
    for name, value in re.findall(r'^(\w+)="([^"]*)"', text, flags=re.M):
        variables[name] = value.split()
    commands = []
    for line in re.sub(r'^(\w+)="([^"]*)"', "", text, flags=re.M).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens[:-1]):
            script = tokens[i + 1]
            if token in PYTHONS and script.endswith(".py") and not script.startswith("-"):
                args = []
                for arg in tokens[i + 2:]:
                    if arg in {";", "&&", "||", "|", "&"}:
                        break
                    args += variables.get(arg[1:], [arg]) if arg.startswith("$") else [arg]
                commands.append((Path(script).stem, args))
    return commands


def flag_problems(script: str, args: list[str], options: dict[str, argparse.Action]) -> list[str]:
    """What is wrong with these arguments for this parser: unknown flags (abbreviations included), a flag that
    takes a value without one, a value after a flag that takes none."""
    problems, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # reproduce.py: the rest goes to run_glue.py
            problems += flag_problems("run_glue", args[i + 1:], _options(script_parsers("run_glue")))
            break
        if not arg.startswith("-"):
            problems.append(f"{script}.py: stray argument {arg!r}")
            i += 1
            continue
        name, has_value = arg.split("=", 1)[0], "=" in arg
        action = options.get(name)
        following = args[i + 1] if i + 1 < len(args) else None
        takes_value = not has_value and following is not None and not following.startswith("--")
        if action is None:  # its value, if any, is not reported again
            problems.append(f"{script}.py: unknown flag {name}")
            i += 2 if takes_value else 1
            continue
        if action.nargs == 0 and (has_value or takes_value):
            problems.append(f"{script}.py: {name} takes no value")
        elif action.nargs is None and not (has_value or takes_value):
            problems.append(f"{script}.py: {name} needs a value")
        i += 2 if takes_value else 1
    return problems


def readme_problems(markdown: str) -> list[str]:
    problems = []
    for block in shell_blocks(markdown):
        for script, args in python_commands(block):
            if script not in SCRIPTS:
                if (ROOT / f"{script}.py").is_file():
                    problems.append(f"{script}.py: a script this test does not know (add it to SCRIPTS)")
                continue
            problems += flag_problems(script, args, _options(script_parsers(script)))
    return problems


def test_readme_commands_use_only_flags_their_scripts_define():
    markdown = README.read_text(encoding="utf-8")
    commands = [c for block in shell_blocks(markdown) for c in python_commands(block)]
    scripts = {script for script, _ in commands}
    # The extraction itself: the original README's stages, inference, calibration, export, augmentation.
    assert len(commands) >= 15, commands
    assert {"run_glue", "train_gate", "train_gate_new", "export_subnet", "augment_data"} <= scripts
    assert readme_problems(markdown) == []


def test_a_made_up_flag_in_a_readme_block_fails():
    good = "```bash\npython run_glue.py --task_name RTE \\\n  --do_train --learning_rate 2e-5\n```\n"
    assert readme_problems(good) == []
    bad = good.replace("--do_train", "--do_train --learning_rates 3")
    assert readme_problems(bad) == ["run_glue.py: unknown flag --learning_rates"]
    abbreviated = good.replace("--learning_rate 2e-5", "--learning 2e-5")
    assert readme_problems(abbreviated) == ["run_glue.py: unknown flag --learning"]
    assert readme_problems(good.replace("--do_train", "--do_train yes")) == ["run_glue.py: --do_train takes no value"]
    assert readme_problems(good.replace(" 2e-5", "")) == ["run_glue.py: --learning_rate needs a value"]
    assigned = '```bash\nD="--task_name x\n   --bogus_flag 1"\n.venv/bin/python train_gate.py $D --do_eval\n```\n'
    assert readme_problems(assigned) == ["train_gate.py: unknown flag --bogus_flag"]
    calibration = "```bash\npython train_gate_new.py --calibrate --flops_budget 0.5 --model_dir m\n```\n"
    assert readme_problems(calibration) == []
    forwarded = "```bash\npython reproduce.py --seeds 1 -- --pooling mean --no_such 1\n```\n"
    assert readme_problems(forwarded) == ["run_glue.py: unknown flag --no_such"]


def test_readme_is_short_and_has_no_internal_references():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    assert not re.search(r"\bissues?\s*#?\d+|(?<![\w&/])#\d+\b", text, flags=re.I)
    assert not re.search(r"\bsession[\s-]\d+|\bwork[\s-]?log\b", text, flags=re.I)
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", h) and re.search(r"[a-f]", h)]
    assert hashes == []
    first_block = shell_blocks(text)[0]
    assert "make demo" in first_block  # the first block installs and runs the main job


def documented_flags() -> set[str]:
    """The `--flags` docs/cli.md names, outside HTML comments (notes kept there for flags still to come)."""
    doc = re.sub(r"<!--.*?-->", "", CLI_DOC.read_text(encoding="utf-8"), flags=re.S)
    return set(re.findall(r"(?<![\w-])--[A-Za-z][A-Za-z0-9_]*", doc))


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_doc_names_every_flag_of_every_script(script):
    documented = documented_flags()
    flags = {f for f in _options(script_parsers(script)) if f.startswith("--") and f != "--help"}
    assert flags - documented == set()


def test_cli_doc_names_no_flag_that_does_not_exist():
    documented = documented_flags()
    known = {f for script in SCRIPTS for f in _options(script_parsers(script))}
    known |= {"--nproc_per_node"} | set(HAND_PARSED_FLAGS)  # torchrun's; run_profile.py's
    assert documented - known == set()


# run_profile.py parses its one argument by hand (stdlib only, run with python3 before any venv): its flags.
HAND_PARSED_FLAGS = {"--bf16_supported": ("run_profile", [0, 1])}


@pytest.mark.parametrize("flag", HAND_PARSED_FLAGS)
def test_hand_parsed_flags_exist(flag, capsys):
    script, exit_codes = HAND_PARSED_FLAGS[flag]
    assert importlib.import_module(script).main([flag]) in exit_codes  # 2 (usage) if the flag were unknown
    assert importlib.import_module(script).main(["--no_such_flag"]) == 2
