"""No import cycles inside ``pipeline/``: every import counts, those inside functions too (a lazy import
still makes two modules depend on each other). The graph is grimp's, the one import-linter checks its
contracts on."""

import grimp

# Imports that close a cycle being fixed elsewhere, (importer, imported); remove an entry with its fix.
KNOWN: set = set()


def cycles(graph: grimp.ImportGraph, package: str) -> list:
    """The strongly connected components of more than one module among ``package``'s modules (Tarjan's
    algorithm, iterative), each sorted; a module importing itself counts as a cycle of one."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    edges = {m: sorted(n for n in graph.find_modules_directly_imported_by(m)
                       if n in modules and (m, n) not in KNOWN) for m in modules}
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges[node]:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found)


def test_pipeline_has_no_import_cycles():
    graph = grimp.build_graph("pipeline", cache_dir=None)
    assert cycles(graph, "pipeline") == []


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cyclic import b\n    return b\n")
    (package / "b.py").write_text("from cyclic import a\n")
    (package / "c.py").write_text("import cyclic.b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cycles(grimp.build_graph("cyclic", cache_dir=None), "cyclic") == [["cyclic.a", "cyclic.b"]]


RAY_EXECUTOR = "pipeline/executors/ray.py"  # the one module allowed to import Ray


def ray_importers(root) -> list:
    """The modules under ``root`` (a folder; paths relative to its parent) that import ``ray`` or a part of it
    anywhere (inside functions too), sorted."""
    import ast
    from pathlib import Path

    root = Path(root)
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.append(path.relative_to(root.parent).as_posix())
                break
    return found


def test_only_the_ray_executor_imports_ray():
    from pathlib import Path

    import pipeline

    assert ray_importers(Path(pipeline.__file__).parent) == [RAY_EXECUTOR]


def test_the_ray_check_sees_every_form_of_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("def f():\n    import ray\n")
    (package / "b.py").write_text("from ray.util import queue\n")
    (package / "sub" / "c.py").write_text("import os, ray.data as rd\n")
    (package / "d.py").write_text("from . import ray\nimport rayon\n# import ray\n")  # none of these is Ray
    assert ray_importers(package) == ["pkg/a.py", "pkg/b.py", "pkg/sub/c.py"]
