"""The import boundary: the proxy core (proxy/ but for proxy/emulator and proxy/loadgen, middlewares/,
plugins/) never imports the emulator or the load generator. Those are test and demo tools; a proxy that
imported them would ship and start them (and their dependencies) in production.

The command line is the one exception, by construction: `proxy/cli.py` launches all three programs, so
its `emulate`, `loadgen` and `demo` subcommands import their tool inside the function that runs it (never
at module level, so `serve` never loads it), and `proxy/demo.py` is what the `demo` subcommand runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("proxy.emulator", "proxy.loadgen")
LAUNCHERS = {"proxy/demo.py"}
"""Modules that exist to run a tool (whole module exempt; reachable only through a lazy import)."""
LAZY_ONLY = {"proxy/cli.py", "proxy/__main__.py"}
"""Modules that may import a tool only inside a function body."""


def _core_files() -> Iterator[Path]:
    for top in ("proxy", "middlewares", "plugins"):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(("proxy/emulator/", "proxy/loadgen/")) or relative in LAUNCHERS:
                continue
            yield path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(absolute module imported, line, whether at module level) for every import in `path`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno, id(node) in top_level
            for alias in node.names:  # `from . import emulator` names the package in the alias
                yield f"{target}.{alias.name}", node.lineno, id(node) in top_level


def _is_tool(name: str) -> bool:
    return any(name == tool or name.startswith(tool + ".") for tool in TOOLS)


def test_the_resolver_sees_relative_imports() -> None:
    """The check below depends on relative imports being resolved: pin that on a known import."""
    seen = {name for name, _, _ in _imports(ROOT / "proxy" / "cli.py")}
    assert "proxy.emulator.app" in seen and "proxy.loadgen.runner" in seen
    assert any(_is_tool(name) for name, _, _ in _imports(ROOT / "proxy" / "demo.py"))


def test_the_core_never_imports_the_emulator_or_the_load_generator() -> None:
    files = list(_core_files())
    listed = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"proxy/ingress.py", "proxy/state/base.py", "middlewares/limits.py"} <= listed  # it walks
    offences = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        for name, line, top_level in _imports(path):
            if (name == "proxy.demo" or name.startswith("proxy.demo.")) and top_level:
                # the demo launcher imports the emulator: it may be imported lazily only
                offences.append(f"{relative}:{line} imports {name} at module level")
            if not _is_tool(name):
                continue
            if relative in LAZY_ONLY and not top_level:
                continue
            offences.append(f"{relative}:{line} imports {name}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("entry", ["proxy.app", "proxy.cli", "proxy.config", "middlewares"])
def test_loading_the_proxy_loads_no_tool(entry: str) -> None:
    """At run time too (transitive imports included): importing the proxy's entry points, and building
    its application, leaves no emulator or load generator module in `sys.modules`."""
    script = (
        f"import sys, importlib; importlib.import_module({entry!r})\n"
        "from proxy.app import build_app\n"
        "from proxy.config import load_config\n"
        "from proxy.telemetry.setup import build_telemetry\n"
        "config = load_config(None)\n"
        "build_app(config, build_telemetry(config.telemetry))\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TOOLS!r})))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
