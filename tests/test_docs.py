"""What README.md and benchmarks/NOTES.md tell users to run: every script they name is there, and every flag they
give one is a flag it takes."""
import argparse
import dataclasses
import importlib.util
import os
import re

import pytest

import evaluate
import logger
import prep_dataset
import train
from clip import CLIPConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("benchmarks", "NOTES.md"))


class Parsed(Exception):
    pass


def options(main, monkeypatch):
    """The flags of a script's argparse parser, taken from main() as it parses (nothing else of main runs)."""
    def grab(parser, *args, **kwargs):
        raise Parsed(parser)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(Parsed) as caught:
            main([]) if main.__code__.co_argcount else main()
    return {o.lstrip("-") for action in caught.value.args[0]._actions for o in action.option_strings}


def commands(text):
    """(script, flags) for every command of the scripts a text gives: in a code block, a line up to its comment;
    in prose, a code span. Flags written as --name or --name=value."""
    found = []
    for m in re.finditer(r"\b((?:benchmarks/)?\w+)\.py\b([^`\n]*)", text):
        flags = re.findall(r"(?<![\w-])--(\w+)", m.group(2).split("#")[0])
        found.append((os.path.basename(m.group(1)), flags))
    return found


def test_every_flag_the_docs_give_is_one_the_script_takes(monkeypatch):
    takes = {"train": {f.name for f in dataclasses.fields(train.TrainConfig)}
             | {f.name for f in dataclasses.fields(CLIPConfig)} | {"config", "help"},
             "evaluate": options(evaluate.main, monkeypatch), "prep_dataset": options(prep_dataset.main, monkeypatch),
             "logger": options(logger.main, monkeypatch)}
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # as a script there sees its siblings
    for path in sorted(os.listdir(os.path.join(ROOT, "benchmarks"))):
        if path.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"doc_{path[:-3]}", os.path.join(ROOT, "benchmarks", path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            takes[path[:-3]] = options(module.main, monkeypatch)
    checked = 0
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for script, flags in commands(text):
            if script not in takes:  # a file named in prose: one of the project's, by that name
                folders = ("", "benchmarks", "tests")
                assert any(os.path.isfile(os.path.join(ROOT, d, script + ".py")) for d in folders), \
                    f"{doc} names {script}.py, which is not in the project"
                continue
            unknown = [flag for flag in flags if flag not in takes[script]]
            assert not unknown, f"{doc}: {script}.py takes no --{', --'.join(unknown)}"
            checked += len(flags)
    assert checked > 100  # the docs' commands were found, not skipped
