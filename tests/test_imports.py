import ast
from pathlib import Path

import icl_retriever

PACKAGE = Path(icl_retriever.__file__).resolve().parent


def test_all_lists_the_public_api() -> None:
    assert set(icl_retriever.__all__) >= {"Demo", "PIEEncoder", "Retriever", "build_index"}
    for name in icl_retriever.__all__:
        assert hasattr(icl_retriever, name), name


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every import of a package module by another: at module level, inside functions (lazy) and under
    ``TYPE_CHECKING`` alike. Importing ``a.b.c`` runs ``a.b``'s ``__init__`` too, so that counts as an edge."""
    modules = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        edges = set()
        for target in targets:
            parts = target.split(".")
            # the target and every package above it, but not the top package (it only gathers names)
            edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {t for t in edges if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def test_no_import_cycles_between_modules() -> None:
    graph = _import_graph()
    assert "icl_retriever.encoder.pie" in graph and "icl_retriever.calibration" in graph["icl_retriever.encoder.pie"]

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        stack = [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    assert [m for m in sorted(graph) if m in reachable(m)] == []
