"""The library's modules form layers: no import circle, module-level or inside a function (a lazy import hides a circle
from Python but not from a reader). Run this file directly to print the layering."""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "t2i_nb"


def imports_of(path: Path) -> set[str]:
    "The t2i_nb modules `path` imports anywhere in its body (`from .x`, `from t2i_nb.x`, `import t2i_nb.x`)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: parts = mod.split(".") if mod else []
            elif mod == "t2i_nb" or mod.startswith("t2i_nb."): parts = mod.split(".")[1:]
            else: continue
            if parts: found.add(parts[0])
            else: found |= {a.name.split(".")[0] for a in node.names}          # from . import x / from t2i_nb import x
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("t2i_nb.")}
    return found - {path.stem}


def import_graph(lib: Path = LIB) -> dict[str, set[str]]:
    mods = {p.stem for p in lib.glob("*.py")} - {"__init__", "_modidx"}
    return {m: imports_of(lib / f"{m}.py") & mods for m in sorted(mods)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One import circle as [a, b, ..., a], or None."
    state, stack = {}, []
    def visit(m):
        state[m] = "open"; stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open": return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)): return c
        state[m] = "done"; stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (c := visit(m)): return c
    return None


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    "Modules by layer: layer 0 imports no library module, layer k imports only modules of layers < k."
    done, out = set(), []
    while len(done) < len(graph):
        layer = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert layer, "import circle"
        out.append(layer); done |= set(layer)
    return out


def test_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle in t2i_nb: {' -> '.join(cycle)}"
    for i, layer in enumerate(layers(graph)): print(f"layer {i}: {', '.join(layer)}")


def test_low_modules_stay_low():
    "The asset cache needs only core and files; the architectures read the config by attribute, without importing it."
    graph = import_graph()
    assert graph["cache"] <= {"core", "files"}, graph["cache"]
    assert "config" not in graph["archs"] and "train" not in graph["archs"]
    assert "synthbirds" not in graph["data"] and "evaluator" not in graph["metrics"]


if __name__ == "__main__":
    g = import_graph()
    print("cycle:", find_cycle(g))
    for i, layer in enumerate(layers(g)):
        print(f"layer {i}: " + "; ".join(f"{m} <- {', '.join(sorted(g[m])) or '-'}" for m in layer))
