"""Every count, size, index and seed flag of every command refuses a value out of range
before any work: argparse's one-line error naming the flag, exit status 2."""

from __future__ import annotations

import importlib

import pytest

CASES = [  # (command module, flag, bad value, what the message says)
    ("infer.generate", "--max-new-tokens", "0", "0 must be >= 1"),
    ("infer.generate", "--batch-size", "-1", "-1 must be >= 1"),
    ("infer.generate", "--max-len", "ten", "'ten' is not an integer"),
    ("infer.generate", "--top-k", "-5", "-5 must be >= 0"),
    ("infer.generate", "--seed", "-1", "-1 must be >= 0"),
    ("infer.bench", "--repeats", "0", "0 must be >= 1"),
    ("infer.bench", "--limit", "0", "0 must be >= 1"),
    ("infer.calibrate", "--batch-size", "0", "0 must be >= 1"),
    ("infer.passes", "--context", "-8", "-8 must be >= 1"),
    ("infer.passes", "--context", "0", "0 must be >= 1"),
    ("infer.passes", "--copy-mib", "0", "0 must be >= 1"),
    ("train.main", "--steps", "0", "0 must be >= 1"),
    ("train.main", "--seq-len", "1.5", "'1.5' is not an integer"),
    ("train.main", "--keep", "0", "0 must be >= 1"),
    ("train.main", "--eval-every", "-1", "-1 must be >= 0"),
    ("train.distill", "--start", "-2", "-2 must be >= 0"),
    ("train.distill", "--batch-size", "0", "0 must be >= 1"),
    ("convert.from_hf", "--block-size", "0", "0 must be >= 1"),
    ("convert.from_gguf", "--mask-token-id", "-1", "-1 must be >= 0"),
    ("infer.generate", "--projections", "sideways", "invalid choice: 'sideways'"),
    ("infer.serve.cli", "--projections", "out_in", "invalid choice: 'out_in'"),
    ("infer.passes", "--projections", "no", "invalid choice: 'no'"),
]


@pytest.mark.parametrize("module,flag,value,message", CASES,
                         ids=[f"{c[0]}{c[1]}={c[2]}" for c in CASES])
def test_out_of_range_flag_is_refused_naming_it(module, flag, value, message, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err, err


def test_console_scripts_name_each_command_line_once():
    """``[project.scripts]``: every entry is a command module's ``main`` (which a script
    calls with no arguments), and every module run as ``python -m`` has one."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert name.startswith("orthrus-") and attr == "main", (name, target)
        assert callable(getattr(importlib.import_module(module), attr)), target
        targets[module] = name
    assert len(targets) == len(scripts)  # no module twice
    # a module run as ``python -m``, or a package's command line (``pkg/cli.py`` beside
    # its ``__main__.py``)
    commands = {f"{p.parent.name}.{p.stem}" for folder in ("infer", "convert", "train")
                for p in (root / folder).glob("*.py")
                if 'if __name__ == "__main__":' in p.read_text()}
    commands |= {f"{folder}.{p.parent.name}.cli" for folder in ("infer", "convert", "train")
                 for p in (root / folder).glob("*/__main__.py")}
    assert commands == set(targets), commands ^ set(targets)
