"""The layout's rules hold: data flows one way (web → services → rules → db) and only the web
layer knows aiohttp's server side (the contracts are in ``.importlinter``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "connector"
# The only places allowed to know aiohttp's server: the web layer, and the CLI that runs it.
WEB_SIDE = ("connector/web/", "connector/cli.py")


def _imports_aiohttp_web(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name.startswith("aiohttp.web") for alias in node.names):
                return True
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("aiohttp.web"):
                return True
            if node.module == "aiohttp" and any(alias.name == "web" for alias in node.names):
                return True
    return False


def test_layering_only_the_web_layer_imports_aiohttp_web():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(WEB_SIDE):
            continue
        if _imports_aiohttp_web(ast.parse(path.read_text(), relative)):
            offenders.append(relative)
    assert offenders == []


def test_layering_import_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(linter), "--config", str(ROOT / ".importlinter")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout
