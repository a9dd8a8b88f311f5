"""The package's shape: no import cycles between launcher modules (local imports included), and the
files a plain wheel install needs (recipes, sbatch templates, accelerate/DeepSpeed configs) are package data.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "launcher"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every launcher module this file imports, at the top or inside functions."""
    found: set[str] = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from launcher.x import y` imports the submodule launcher.x.y when there is one
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found.update(name for name in names if name in modules and name != this)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_in_the_package() -> None:
    modules = known_modules()
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    assert sum(len(edges) for edges in graph.values()) > 50  # the walk really sees the imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_a_local_import_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_recipes_templates_and_configs_are_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    assert "templates/*.sh" in data["launcher"]
    assert {"accelerate/*.yaml", "deepspeed/*.json"} <= set(data["launcher.recipes"])
    assert data["launcher.data"] == ["digits.csv.gz"] and (PACKAGE / "data" / "digits.csv.gz").is_file()
    templates = {p.name for p in (PACKAGE / "templates").glob("*.sh")}
    assert templates == {"common.sh", "resnet101.sh", "resnet50.sh", "resnet18.sh", "finetune.sh"}
    for name in ("a1", "a2", "a3", "finetune"):
        assert (PACKAGE / "recipes" / f"{name}.py").is_file()
    # the checkout's entry points stay thin: they only import the packaged recipe and run it
    for name in ("a1", "a2", "a3"):
        text = (REPO / "recipes" / f"{name}.py").read_text()
        assert f"from launcher.recipes.{name} import RECIPE" in text and "TrainConfig(" not in text
