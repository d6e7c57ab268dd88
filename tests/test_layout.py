"""The package layout is the architecture: every file imports, arrows run one way, no cycles.

    clients.cli -> clients (HTTP) ;  clients.cli -> service -> modules
    modules: core <- kinds <- peft <- registry <- training   (compose may ask the registry for its parts)

Checked over every Python file of the three packages, imports inside functions included.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("modules", "service", "clients")
FILES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))

# Within `modules`, each layer may import only the layers before it.
LAYERS = ["modules.core", "modules.kinds", "modules.peft", "modules.registry", "modules.training"]
# The one upward arrow: a composed module builds its parts by kind.
ALLOWED_UP = {("modules.kinds.compose", "modules.registry")}


def name_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {name_of(p): p for p in FILES}


def imports(path: Path) -> set[str]:
    """Every first-party module `path` imports, at any depth (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in NAMES or t.split(".")[0] in PACKAGES and t.count(".") == 0}
    found.discard(name_of(path))
    return found


GRAPH = {name: imports(path) for name, path in NAMES.items()}


def layer(name: str) -> int | None:
    return next((i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + ".")), None)


def test_the_layout_covers_every_file():
    assert len(NAMES) > 60 and {"modules.core.batch", "modules.kinds.lora", "modules.registry",
                                "modules.training.train", "service.app", "clients.cli"} <= set(NAMES)
    stray = [n for n in NAMES if n.startswith("modules.") and layer(n) is None]
    assert not stray, f"files of `modules` outside every layer: {stray}"


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_file_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_arrows_run_one_way(name):
    top = name.split(".")[0]
    bad = []
    for target in GRAPH[name]:
        to = target.split(".")[0]
        if top == "modules" and to in ("service", "clients"):
            bad.append(target)
        elif top == "service" and to == "clients":
            bad.append(target)
        elif top == "clients" and name != "clients.cli" and to in ("service", "modules"):
            bad.append(target)
        elif top == to == "modules" and layer(target) > layer(name) and (name, target) not in ALLOWED_UP:
            bad.append(target)
    assert not bad, f"{name} imports {bad} against the layering"


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_no_code_asks_which_kind_a_module_is():
    """Kinds differ through their methods; only the registry maps a kind's name to its class."""
    ask = re.compile(r"""(?<!dtype\.)\bkind\s*(==|!=|in)\s*["'(\[{]""")  # a kind compared with a name
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in FILES if p.name != "registry.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if ask.search(line)]
    assert not hits, hits


def test_clients_never_import_torch():
    code = ("import sys, clients, clients.client; assert 'torch' not in sys.modules, 'clients imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
