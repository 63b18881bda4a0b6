"""No import circles in the package: every ``import`` of ours, at module level or inside a
function (a lazy import still ties the modules together), read from the source."""

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
# where each package's source lives (pyproject.toml maps convert/ and apps/ under ifp_mlx)
PACKAGES = {"ifp_mlx": ROOT / "ifp_mlx", "ifp_mlx.convert": ROOT / "convert",
            "ifp_mlx.apps": ROOT / "apps"}  # fmt: skip


def modules(packages: Dict[str, Path] = PACKAGES) -> Dict[str, Path]:
    out = {}
    for pkg, base in packages.items():
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if len(parts) > 1 and f"{pkg}.{parts[0]}" in packages:
                continue  # a mapped subpackage (a symlink in a copied tree): its own base
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Our modules ``name`` imports. ``from . import x`` names the submodule x, not the
    package (whose ``__init__`` is already running when a submodule imports it)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(subs)
            if len(subs) < len(node.names) and target in known:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
    out.discard(name)
    return out


def graph(packages: Dict[str, Path] = PACKAGES) -> Dict[str, Set[str]]:
    mods = modules(packages)
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def find_cycle(g: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle (``[a, b, ..., a]``), or None."""
    state: Dict[str, int] = {}  # 1: on the path, 2: done
    path: List[str] = []

    def visit(v: str) -> Optional[List[str]]:
        state[v] = 1
        path.append(v)
        for w in sorted(g[v]):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(g):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_package_has_no_import_circles():
    g = graph()
    assert len(g) > 40 and "ifp_mlx.serve.engine" in g and "ifp_mlx.convert.core" in g
    cycle = find_cycle(g)
    assert cycle is None, " -> ".join(cycle)


def unresolved(packages: Dict[str, Path] = PACKAGES) -> List[str]:
    """Relative imports whose module is not ours (a module moved, an import left behind)."""
    mods = modules(packages)
    bad = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if target not in mods:
                    bad.append(f"{name}: from {'.' * node.level}{node.module or ''} import ...")
    return bad


def test_every_relative_import_names_a_module_of_ours():
    """Lazy imports run only when their function does: a moved module's stale ``from .x``
    would wait in a benchmark until a user ran it."""
    assert unresolved() == []


def test_errors_is_the_ground_floor():
    """Errors (and the file helpers beside them) import nothing of ours."""
    assert graph()["ifp_mlx.errors"] == set()


def test_the_walker_finds_a_circle_introduced_on_purpose(tmp_path):
    """The check itself: a lazy import of distributed in errors (the circle this test was
    written for) and a package/submodule loop are found; the real tree without them is clean."""
    pkg = tmp_path / "ifp_mlx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .errors import IFPError\n")
    (pkg / "errors.py").write_text("def f():\n    from .distributed import lost_peer\n")
    (pkg / "distributed.py").write_text("from .selection import x\n")
    (pkg / "selection.py").write_text("from .errors import IFPError\n")
    g = graph({"ifp_mlx": pkg})
    cycle = find_cycle(g)
    assert cycle[0] == cycle[-1] and set(cycle) == {
        "ifp_mlx.errors", "ifp_mlx.distributed", "ifp_mlx.selection"}  # fmt: skip
    (pkg / "errors.py").write_text("class IFPError(Exception):\n    pass\n")
    assert find_cycle(graph({"ifp_mlx": pkg})) is None
    sub = pkg / "predictors"
    sub.mkdir()
    (sub / "__init__.py").write_text("from . import activation\nScores = 1\n")
    (sub / "activation.py").write_text("from . import Scores\n")  # the registry loop
    cycle = find_cycle(graph({"ifp_mlx": pkg}))
    assert set(cycle) == {"ifp_mlx.predictors", "ifp_mlx.predictors.activation"}
    (sub / "activation.py").write_text("def f():\n    from .chat import Conversation\n")
    assert unresolved({"ifp_mlx": pkg}) == ["ifp_mlx.predictors.activation: from .chat import ..."]
