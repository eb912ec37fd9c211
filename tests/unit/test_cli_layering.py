"""The layering, read from the source: the shared package `vlm` imports neither service nor
anything above it, the two services never import each other, and the `vlm` entry point's
command table holds functions, not module names to import by string."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module that `path` (the module named `module`) imports: `import`, `from ... import`
    (relative ones resolved) and `importlib.import_module("...")` / `__import__("...")` with a
    literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                found.add(node.module or "")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                found.add(arg.value)
    return found


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    out = []
    for path in files:
        for mod in sorted(_imports(path, _module_name(path))):
            if mod.split(".")[0] in forbidden:
                out.append(f"{path.relative_to(ROOT)} imports {mod}")
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("vlm", ("preprocessor_svc", "model_svc", "bench", "vlm_cli")),
        ("preprocessor_svc", ("model_svc", "vlm_cli")),
        ("model_svc", ("preprocessor_svc", "vlm_cli")),
    ],
)
def test_package_does_not_import_upward_or_sideways(package: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(package, forbidden) == []


def test_import_scan_sees_relative_and_string_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from . import types\nfrom .errors import VlmError\nimport importlib\n"
        "importlib.import_module('model_svc.main')\n"
    )
    assert _imports(probe, "vlm.probe") == {"vlm", "vlm.errors", "importlib", "model_svc.main"}


def test_cli_commands_are_callables_not_strings() -> None:
    from vlm_cli import main as cli

    assert set(cli.COMMANDS) == {
        "serve-preprocessor", "serve-model", "preprocess", "generate", "health", "demo", "bench",
    }
    for name, command in cli.COMMANDS.items():
        assert callable(command.run) and not isinstance(command.run, str), name
        assert isinstance(command.help, str) and command.help, name
