"""The package's layers, read from the source (every import statement, inside functions too):
each module imports only modules of its own layer or below, and the import graph has no cycle.
docs/architecture.md draws the same map."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"qcompile": "qcompile", "qcompile/formats": "qcompile.formats",
           "qcompile/integrations": "qcompile.integrations", "passes": "qcompile.passes",
           "codegen": "qcompile.codegen", "codegen/triton": "qcompile.codegen.triton",
           "codegen/cpu": "qcompile.codegen.cpu",
           "qcompile/tools": "qcompile.tools"}

# lowest first; a module not listed is a failure (a new module needs a place on the map).
# A folder is one layer: qcompile/formats/ is the numerical core, qcompile/integrations/ is top.
LAYERS = [
    ("core", ["qcompile.formats", "qcompile.formats.*", "qcompile.config", "qcompile.policy",
              "qcompile.linear_rule", "qcompile.experts"]),
    ("codegen", ["qcompile.codegen", "qcompile.codegen.*"]),
    ("api", ["qcompile.api"]),
    ("ops", ["qcompile.ops", "qcompile.proxy"]),
    ("passes", ["qcompile.passes", "qcompile.passes.*"]),
    ("top", ["qcompile.integrations", "qcompile.integrations.*", "qcompile.swap",
             "qcompile.expert_stack", "qcompile.experts_call",
             "qcompile.tensor_parallel",
             "qcompile.explain", "qcompile.backend", "qcompile.aot", "qcompile.aot_decode", "qcompile.serialize",
             "qcompile.search",
             "qcompile.__main__", "qcompile"]),
]
TOOLS = ["qcompile.tools", "qcompile.tools.codebook_optimizer"]  # offline: never imported


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (an ``from x import y`` names x.y when that is a
    module, else x)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if name == m or (m.endswith(".*") and name.startswith(m[:-1])):
                return i
    raise AssertionError(f"{name} has no layer in tests/test_import_graph.py LAYERS")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def test_every_module_has_a_layer():
    for name in graph():
        if name not in TOOLS:
            layer_of(name)


def test_imports_go_down_the_layers():
    bad = []
    for name, deps in graph().items():
        if name in TOOLS:
            continue
        for dep in deps:
            assert dep not in TOOLS, f"{name} imports the offline tool {dep}"
            if layer_of(dep) > layer_of(name):
                bad.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} "
                           f"({LAYERS[layer_of(dep)][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph reads every import statement: a relative one inside a function counts."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from .. import api\n    from .reference import quantize\n")
    known = {"qcompile.api", "qcompile.reference", "qcompile.codegen.mod"}
    assert imports("qcompile.codegen.mod", src, known) == {"qcompile.api"}
    src.write_text("def f():\n    from qcompile import reference\n")
    assert imports("qcompile.codegen.mod", src, known) == {"qcompile.reference"}


def test_the_formats_folder_stands_alone():
    """qcompile/formats/ is the numerical core: its modules import only each other (not config,
    not the codegen, not torch.compile's or transformers' machinery), so a format can be read,
    quantised and checked without the backend."""
    source_imports = {}
    for path in sorted((ROOT / "qcompile/formats").glob("*.py")):
        tree = ast.parse(path.read_text())
        source_imports[path.stem] = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                                     for a in n.names}
        source_imports[path.stem] |= {n.module or "" for n in ast.walk(tree)
                                      if isinstance(n, ast.ImportFrom) and not n.level}
    assert {"presets", "bits", "elements", "scales", "codebooks", "packing", "qtensor",
            "reference"} <= set(source_imports)
    for name, deps in graph().items():
        if name.startswith("qcompile.formats"):
            outside = sorted(d for d in deps if not d.startswith("qcompile.formats"))
            assert not outside, f"{name} imports {outside} from outside qcompile/formats/"
    heavy = ("torch._dynamo", "torch._inductor", "torch.fx", "triton", "transformers", "qcompile")
    for stem, found in source_imports.items():
        bad = sorted(m for m in found if m.startswith(heavy))
        assert not bad, f"qcompile/formats/{stem}.py imports {bad}"
