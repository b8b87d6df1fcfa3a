"""The package's imports point one way: each module imports only its own stage and the
stages below it, and no modules import each other in a loop (a deferred import inside a
function counts like any other)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llmsrec"

#: low -> high. A module may import modules of its own layer or of a lower one.
LAYERS = [
    # leaves every stage may use
    {"errors", "defaults", "locks", "atomic", "safetensors_io", "devices", "distributed", "metrics",
     "run_layout", "seeds", "training", "__init__"},
    {"data"},
    {"cfsrec"},
    {"cache"},
    {"precompute"},
    {"heads"},
    {"e2e"},
    {"baselines"},
    {"evaluate"},
    {"pipeline"},
    {"experiments", "doctor"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(module: str) -> int:
    stage = stage_of(module)
    for i, layer in enumerate(LAYERS):
        if stage in layer:
            return i
    raise AssertionError(f"{module}: stage {stage!r} has no layer in tests/test_architecture.py")


def internal_imports(text: str, me: str, is_package: bool, modules: set[str]) -> list[tuple[str, int]]:
    """(imported llmsrec module, line) for every import in module ``me``'s source, at any depth."""
    out = []
    for node in ast.walk(ast.parse(text, me)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "llmsrec"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_package else me.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "llmsrec":
                continue
            out.append((target, node.lineno))
            # ``from llmsrec.pkg import module`` imports that module too
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names if f"{target}.{a.name}" in modules]
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): internal_imports(p.read_text(), module_name(p), p.name == "__init__.py", modules)
            for p in files}


def test_the_layer_table_covers_every_stage():
    for m in graph():
        layer_of(m)


def test_no_import_points_up_the_stage_order():
    up = []
    for m, imports in graph().items():
        for target, line in imports:
            if target == "llmsrec":  # the package root: __version__ only
                continue
            if layer_of(target) > layer_of(m):
                up.append(f"{m} (line {line}) imports {target}: "
                          f"{stage_of(m)} sits below {stage_of(target)}")
    assert not up, "imports against the stage order:\n" + "\n".join(up)


def test_no_import_cycles():
    g = graph()
    edges = {m: sorted({t for t, _ in imps if t in g and t != m}) for m, imps in g.items()}
    # a package's __init__ hands its modules' names on: an import of the package is an
    # import of the module that defines the name, so drop package -> own-module edges
    for m in edges:
        edges[m] = [t for t in edges[m] if not t.startswith(m + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_cli_modules_stay_thin():
    """Each command group's module parses, calls one stage function and prints: <= 300 lines."""
    long = {p.name: n for p in (PKG / "cli").glob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"llmsrec/cli modules over 300 lines: {long}"


@pytest.mark.parametrize("text, expected", [
    ("from llmsrec.heads.train import TrainConfig\n", ["llmsrec.heads.train"]),
    ("def f():\n    from llmsrec.cli import main\n", ["llmsrec.cli"]),
    ("import llmsrec.pipeline as p\n", ["llmsrec.pipeline"]),
])
def test_the_scanner_sees_top_level_and_deferred_imports(text, expected):
    got = [t for t, _ in internal_imports(text, "llmsrec.data.probe", False,
                                          {"llmsrec.heads.train", "llmsrec.cli", "llmsrec.pipeline"})]
    assert got == expected
    # and the rule flags an import from data up to those stages
    assert all(layer_of(t) > layer_of("llmsrec.data.probe") for t in got)


def test_relative_imports_resolve_against_the_package():
    got = [t for t, _ in internal_imports("from . import views\nfrom ..heads import model\n", "llmsrec.data.probe",
                                          False, {"llmsrec.data.views", "llmsrec.heads.model"})]
    assert got == ["llmsrec.data", "llmsrec.data.views", "llmsrec.heads", "llmsrec.heads.model"]
