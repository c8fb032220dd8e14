"""The package layout (docs/architecture.md): public names, folders of one kind, no import circle.

The public names are the ones both packages exported before the move into folders (issue 20); a change to them
is an API change and belongs in the changelog, not in a refactor. The import graph is read from the source
(every `import` / `from ... import`, at module level and inside functions), so a circle that only a lazy import
hides still fails here.
"""
from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("macl_kernels", "macl")

PUBLIC = {
    "macl_kernels": {"ContrastResult", "DenseInfoNCELoss", "GatherPlan", "InfoNCELoss", "NTXentLoss", "PositionalSupConLoss",
                     "SupConLoss", "dense_info_nce", "gather_metadata", "gather_with_grad", "global_offset",
                     "grouped_info_nce", "info_nce", "nt_xent", "positional_sup_con", "record_communication",
                     "resolve_group", "resolve_impl", "sup_con"},
    "macl": {"MethodConfig", "NetConfig", "OptimConfig", "PretrainConfig", "TrainConfig"},
}
# The only modules allowed at each package's top level; everything else lives in a folder of its kind.
TOP_LEVEL = {
    "macl_kernels": {"__init__", "losses", "compat", "api", "problem", "positives", "precision", "input_checks",
                     "reference", "index_terms", "rownorm", "op"},
    "macl": {"__init__", "cli", "cli_output", "extras", "workflow", "train", "finetune", "predict", "diagnostics",
             "parallel"},
}
FOLDERS = {"macl_kernels": {"eager", "triton", "filter", "distributed"},
           "macl": {"settings", "run", "semi", "demo", "data", "methods", "nets"}}


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_are_the_documented_set(package):
    mod = __import__(package)
    names = {n for n in dir(mod) if not n.startswith("_") and not isinstance(getattr(mod, n), types.ModuleType)}
    names.discard("__version__")
    assert names == PUBLIC[package]
    if hasattr(mod, "__all__"):
        assert set(mod.__all__) == PUBLIC[package]


def test_documented_import_paths_still_work():
    from macl.semi import SemiConfig, train_semi  # docs/workflow.md
    from macl_kernels.distributed import gather_with_grad, record_communication  # docs/distributed.md
    from macl.demo import DemoConfig, run_demo
    import macl_kernels.compat  # noqa: F401  README's migration table
    import macl.workflow  # noqa: F401
    assert callable(train_semi) and callable(run_demo) and callable(gather_with_grad)
    assert SemiConfig.__module__ == "macl.semi.loop" and DemoConfig.__module__ == "macl.demo.pipeline"
    assert record_communication.__module__ == "macl_kernels.distributed.gather"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_stands_in_a_folder_of_its_kind(package):
    base = ROOT / package
    top = {p.stem for p in base.glob("*.py")}
    assert top == TOP_LEVEL[package]
    folders = {p.name for p in base.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == FOLDERS[package]
    for folder in folders:
        init = base / folder / "__init__.py"
        assert init.is_file(), f"{package}/{folder} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "first" in doc, f"{package}/{folder}/__init__.py: docstring must say which module to open first"


def _modules():
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join(parts)] = (path, is_pkg)
    return mods


def import_graph():
    """{module: {modules it imports}} over both packages, from the source's import statements."""
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        pkg = name if is_pkg else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # "import a.b.c" of a module, or a name inside one
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _is_parent_edge(a, b):
    """A package's __init__ importing its own submodule is how re-exports work, not a circle."""
    return b.startswith(a + ".")


def test_no_import_cycle():
    graph = {m: {t for t in ts if not _is_parent_edge(m, t)} for m, ts in import_graph().items()}
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_cycle_finder_sees_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


_IMPORT_LINE = r"(from (?:macl|macl_kernels)[\w.]* import [A-Za-z_][\w, ]*|import (?:macl|macl_kernels)[\w.]*)"


def _doc_import_lines():
    import re
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
            ROOT / "macl_kernels" / "triton" / "README.md"]
    lines = set()
    for doc in docs:
        for m in re.finditer(_IMPORT_LINE, doc.read_text()):
            lines.add(m.group(1).strip().rstrip(","))
    return sorted(lines)


def test_docs_have_import_lines():
    assert "from macl.semi import SemiConfig, train_semi" in _doc_import_lines()


@pytest.mark.parametrize("line", _doc_import_lines())
def test_every_import_line_in_the_docs_runs(line):
    ns: dict = {}
    exec(line, ns)  # an ImportError fails the test; then every name the line promises is bound
    bound = [n.strip().split(" as ")[-1] for n in line.split(" import ", 1)[1].split(",")] if line.startswith("from ") \
        else [line.split()[1].split(".")[0]]
    assert all(n in ns for n in bound), (line, sorted(k for k in ns if not k.startswith("__")))
