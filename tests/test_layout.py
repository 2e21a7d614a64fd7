"""The import direction of the packages: ``convert/`` -> parameters -> ``infer/`` or
``train/``. ``orthrus_jax`` imports none of the other three, ``convert`` and ``infer``
never import ``train``, and nothing imports a CLI module, in its own package or another
(``train`` uses the engine, ``infer.engine``, never ``infer.generate``; the flags that
several command lines share live in ``infer.options``)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orthrus_jax", "convert", "infer", "train")
FORBIDDEN = {"orthrus_jax": {"convert", "infer", "train"}, "convert": {"infer", "train"},
             "infer": {"train"}, "train": set()}
# Modules that are command lines only (the converters are functions with a command line
# attached, and are imported as functions): no other module may import them.
CLI_MODULES = {"infer.generate", "infer.bench", "infer.calibrate", "infer.plan",
               "infer.serve.cli", "infer.serve.__main__", "infer.loadtest", "train.main"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _cli_beside(own: str) -> str | None:
    """The command line a package's ``__main__`` runs (``pkg.cli``), which it may import."""
    return own.removesuffix(".__main__") + ".cli" if own.endswith(".__main__") else None


def violations(package: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        own = ".".join(path.relative_to(root).with_suffix("").parts)
        for line, module in imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(root)}:{line} imports {module}"
            if top in FORBIDDEN[package]:
                bad.append(where)
            elif module in CLI_MODULES and module not in (own, _cli_beside(own)):
                bad.append(f"{where} (a command-line module)")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package):
    assert violations(package) == []


def test_the_check_catches_a_wrong_import(tmp_path):
    for package, name, text in [
            ("orthrus_jax", "bad.py", "import numpy\n\ndef f():\n    from infer.engine import x\n"),
            ("train", "evaluate.py", "from infer.generate import main\n")]:
        (tmp_path / package).mkdir()
        (tmp_path / package / name).write_text(text)
    assert violations("orthrus_jax", tmp_path) == ["orthrus_jax/bad.py:4 imports infer.engine",
                                                   "orthrus_jax/bad.py:4 imports infer.engine.x"]
    assert violations("train", tmp_path) == [
        "train/evaluate.py:1 imports infer.generate (a command-line module)"]
