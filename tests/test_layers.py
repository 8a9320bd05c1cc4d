"""The package is layered: no import cycle among gram's modules, and the CLI sits on top. [ours]

The import graph is read statically with `ast`, every import included: module level, inside
functions and methods, and under `if` (a function-level import only postpones a cycle to the first
call, so it counts like any other). Edges:

- `import gram.a.b`, `from gram.a.b import x`: an edge to `gram.a.b`, and `from gram.a import b`
  where `b` is a submodule, an edge to `gram.a.b`; where `b` is a name defined in `gram.a`, to `gram.a`.
- Relative imports (`from . import b`, `from .b import x`) are made absolute first.
- Importing `gram.a.b` runs `gram/a/__init__.py` first, so the importer gets an edge to each
  enclosing package as well, except the packages that enclose the importer itself: a module inside
  `gram.a` only runs once `gram.a` has started, so its import of `gram.a.c` does not run `gram.a` again.
  (This is what makes `gram/prompts/__init__.py` re-exporting its submodules legal, while a module
  outside the package that imports `gram.a.b` and is imported by `gram/a/__init__.py` is a cycle.)

`gram.cli` imports the stage modules by name (`importlib`, from its STAGES table, so that `gram --help`
does not import torch); those edges are added from the table, and the rule is that nothing but
`gram.__main__` imports `gram.cli`, and nothing imports `gram.__main__`.

The last part checks that each rule's `sources(...)` (workflow/rules/*.smk) and each DVC stage's
`deps:` (dvc.yaml) list the package files its stage imports (the closure of its module over the graph
above), so that a change to one of them reruns the stage, and nothing it does not import. Left out on
purpose, as gram/cli.py is: gram/config.py (a stage reruns when its own params section changes, through
`params:`, not when any section's dataclass does), gram/stage.py (the command-line flags and logging
every stage shares) and gram/__init__.py (the version string).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import yaml

from conftest import ROOT
from gram.stages import absolute_module, import_statements

PACKAGE = ROOT / "gram"
# Imported by every stage and left out of the rerun lists on purpose, see above.
NOT_A_SOURCE = {"gram", "gram.config", "gram.stage"}


# ---------------------------------------------------------------------------------------------
# the import graph


def module_names() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (`gram/a/__init__.py` is `gram.a`)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The gram modules `module` imports anywhere in its file (before adding enclosing packages)."""
    out = set()
    for base, names in import_statements(path, module):
        if not names:
            out.add(base)
        for name in names:
            # `from gram.a import b`: the submodule gram.a.b if there is one, else a name in gram.a
            sub = f"{base}.{name}"
            out.add(sub if sub in modules else base)
    return {name for name in out if name in modules}


def enclosing(name: str) -> list[str]:
    """The packages that enclose module `name`, outermost first (`gram.a.b` -> gram, gram.a)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def stage_table() -> dict[str, str]:
    """gram.cli's STAGES as stage -> module, read from the source (importing gram.cli is what is under test)."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "STAGES" for t in node.targets):
            table = ast.literal_eval(node.value)
            return {stage: target.partition(":")[0] for stage, (target, _) in table.items()}
    raise AssertionError("gram/cli.py has no literal STAGES table")


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """module -> the gram modules that importing it, or calling any of its functions, imports."""
    files = module_names()
    graph = {}
    for module, path in files.items():
        direct = imports_of(module, path, set(files))
        if module == "gram.cli":
            direct |= set(stage_table().values())
        edges = set()
        for target in direct:
            edges.add(target)
            edges.update(p for p in enclosing(target) if p not in enclosing(module) and p != module)
        edges.discard(module)
        graph[module] = frozenset(edges)
    return graph


def cycles(graph: dict[str, set[str] | frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of `graph` that hold a cycle (two or more nodes, or a node
    with an edge to itself), each sorted, in sorted order. Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return sorted(found)


def import_path(graph, start: str, goal: str) -> list[str]:
    """One shortest import chain start -> ... -> goal (to show how a cycle closes)."""
    prev, todo = {start: None}, [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph[node]):
            if nxt not in prev:
                prev[nxt] = node
                todo.append(nxt)
    chain, node = [], goal
    while node is not None:
        chain.append(node)
        node = prev.get(node)
    return chain[::-1]


# ---------------------------------------------------------------------------------------------
# the cycle finder itself


def test_cycle_finder_finds_a_cycle_and_passes_a_dag():
    dag = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert cycles(dag) == []
    looped = {**dag, "c": {"d"}, "e": {"e"}, "f": {"g"}, "g": {"f"}}
    # c -> d -> a -> b/c closes one component of four; e imports itself; f and g import each other
    assert cycles(looped) == [["a", "b", "c", "d"], ["e"], ["f", "g"]]


def test_relative_and_submodule_imports_resolve(tmp_path):
    path = tmp_path / "__init__.py"
    path.write_text("from . import b\nfrom .b import x\nfrom gram.a import name\n"
                    "def f():\n    import gram.c.d\n    from gram.c import name\n")
    modules = {"gram", "gram.a", "gram.a.b", "gram.c", "gram.c.d"}
    assert imports_of("gram.a", path, modules) == {"gram.a.b", "gram.a", "gram.c.d", "gram.c"}
    assert absolute_module("", "gram.a.b", False, 1) == "gram.a"
    assert absolute_module("x", "gram.a.b", False, 2) == "gram.x"
    assert absolute_module("x", "gram.a", True, 1) == "gram.a.x"


def test_graph_counts_function_level_imports_and_enclosing_packages():
    graph = import_graph()
    # gram.data.emoji imports gram.data.shards: gram.data has started already, no edge to it
    assert "gram.data" not in graph["gram.data.emoji"]
    # a function-level import (gram.report imports gram.tables inside a function) is an edge
    assert "gram.tables" in graph["gram.report"]
    assert set(stage_table().values()) <= graph["gram.cli"]


# ---------------------------------------------------------------------------------------------
# the package


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    found = cycles(graph)
    lines = []
    for component in found:
        a = component[0]
        # the chain a -> ... -> b -> a through some b in the component that imports a
        back = next((b for b in component if b != a and a in graph[b]), a)
        chain = import_path(graph, a, back) if back != a else [a]
        lines.append(f"{len(component)} modules: {', '.join(component)}\n"
                     f"    e.g. {' -> '.join(chain + [a])}")
    assert not found, "import cycles in gram/ (strongly connected components):\n" + "\n".join(lines)


def test_cli_is_the_top_layer():
    graph = import_graph()
    for module, edges in graph.items():
        if module != "gram.__main__":
            assert "gram.cli" not in edges, f"{module} imports gram.cli (the CLI imports stages, not the reverse)"
        assert "gram.__main__" not in edges, f"{module} imports gram.__main__"


def test_stage_table_names_existing_modules_with_an_entry():
    modules = module_names()
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    table = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "STAGES" for t in n.targets))
    for stage, (target, _) in table.items():
        module, _, func = target.partition(":")
        assert module in modules, f"stage {stage}: no module {module}"
        defined = {n.name for n in ast.parse(modules[module].read_text()).body if isinstance(n, ast.FunctionDef)}
        assert (func or "main") in defined, f"stage {stage}: {module} defines no {func or 'main'}()"


# ---------------------------------------------------------------------------------------------
# the rerun lists of the workflow


def closure(root: str) -> set[str]:
    graph, seen, todo = import_graph(), set(), [root]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def source_files(entries: list[str]) -> set[str]:
    """Modules covered by `gram/x.py` and `gram/dir` entries (a directory: every module under it)."""
    out = set()
    for entry in entries:
        path = ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        assert all(f.is_file() for f in files), f"{entry}: no such package file"
        out.update(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for f in files)
    return out


def check_sources(where: str, stage: str, entries: list[str]) -> None:
    needed = closure(stage_table()[stage]) - NOT_A_SOURCE
    listed = source_files(entries)
    missing = needed - listed
    assert not missing, f"{where} (`gram {stage}`) imports {sorted(missing)}, not in its sources"
    # a directory may list more modules than are imported; a listed entry must be used at least in part
    for entry in entries:
        assert source_files([entry]) & needed, f"{where}: {entry} is listed but `gram {stage}` does not import it"


def test_stage_table_code_deps_list_what_each_stage_imports():
    """The stage table (gram/stages.py) gives both tools their code inputs: they must be the import closure."""
    from gram import stages as S

    checked = 0
    for st in S.STAGES:
        command = re.match(r"gram ([\w-]+) ", st.cmd)
        if command:
            check_sources(f"stage {st.name}", command.group(1), list(S.code_deps(st.module)))
            checked += 1
    assert checked >= 10


def test_dvc_deps_list_what_each_stage_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        command = re.match(r"gram ([\w-]+) ", stage["cmd"])
        entries = [d for d in stage.get("deps", []) if d.startswith("gram/")]
        if command and entries:
            check_sources(f"dvc stage {name}", command.group(1), entries)
            checked += 1
    assert checked >= 10
