"""The layout's rules, checked from the source: one direction of imports (no import circle among the
modules of ``kernels/`` and ``gpt/``, counting imports at module level and inside functions; ``kernels``
never imports ``gpt``; the library never imports a command-line module), and the ``kernels`` import-name
clash with Hugging Face's kernel-hub distribution made visible."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "gpt")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` — code that runs only when the file is the script ``__main__``."""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def _imports(tree: ast.AST):
    """Every import statement under ``tree`` (module level, functions, classes, try blocks)."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _targets(node, name: str, is_pkg: bool, modules: set[str]) -> set[str]:
    """The modules of ours that an import statement in module ``name`` loads (explicitly)."""
    if isinstance(node, ast.Import):
        bases = [a.name for a in node.names]
        froms: list[tuple[str, str]] = []
    else:
        if node.level:
            pkg = name if is_pkg else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{node.module}" if node.module else pkg
        else:
            base = node.module or ""
        bases = [base]
        froms = [(base, a.name) for a in node.names]
    out = set()
    for base, attr in froms:
        if f"{base}.{attr}" in modules:  # `from pkg import submodule`: pkg's own code is not what is used
            out.add(f"{base}.{attr}")
    if froms and all(f"{b}.{a}" in modules for b, a in froms):
        bases = []
    for base in bases:
        while base and base not in modules:  # `import a.b.c` of a non-module attribute: its module
            base = base.rpartition(".")[0]
        if base:
            out.add(base)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> modules of ours it imports. A file's ``if __name__ == "__main__":`` block is the node
    ``<module>.__main__``: it runs only when the file is executed as a script (``python -m gpt.data``),
    as a module object of its own that nothing imports back, so its imports start from there."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        name = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        mains = [n for n in ast.walk(tree) if _is_main_guard(n)]
        in_main = {id(i) for m in mains for i in _imports(m)}
        graph.setdefault(name, set())
        for node in _imports(tree):
            node_name = f"{name}.__main__" if id(node) in in_main else name
            graph.setdefault(node_name, set()).update(_targets(node, name, is_pkg, modules) - {name})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_graph_sees_imports_everywhere():
    """The checker must see a circle hidden in a function, and the edges this repository relies on."""
    g = import_graph()
    assert "gpt.export" in g["gpt.model"] and "kernels" in g["gpt.model"]
    assert "gpt.cli.prepare" in g["gpt.data.__main__"] and "gpt.cli.prepare" not in g["gpt.data"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse("def f():\n    from .generate import x\n")
    assert _targets(_imports(tree)[0], "gpt.batch_generate", False, {"gpt.generate"}) == {"gpt.generate"}


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_one_direction_of_imports():
    """kernels never imports gpt; the library never imports a CLI module (only the __main__ shims do)."""
    g = import_graph()
    for mod, deps in g.items():
        if mod.startswith("kernels"):
            assert not {d for d in deps if d.startswith("gpt")}, f"{mod} imports {deps}"
        if mod.startswith("gpt") and not mod.startswith("gpt.cli") and not mod.endswith(".__main__"):
            assert not {d for d in deps if d.startswith("gpt.cli")}, f"{mod} imports a CLI module: {deps}"


def test_library_never_parses_argv_or_exits():
    for path in (ROOT / "gpt").rglob("*.py"):
        if "cli" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text())
        mains = {id(i) for m in ast.walk(tree) if _is_main_guard(m) for i in ast.walk(m)}
        for node in ast.walk(tree):
            if id(node) in mains:
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "argparse" not in names, f"{path} imports argparse"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in {("sys", "exit"), ("sys", "argv")}, \
                    f"{path}:{node.lineno} uses sys.{node.attr}"


# --------------------------------------------------------------------- the `kernels` import name
def _fake_hub_kernels(site: Path) -> None:
    """A distribution named `kernels` providing a `kernels` package, as Hugging Face's kernel hub does."""
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("HUB = True\n")
    info = site / "kernels-0.9.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.9.0\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\nkernels-0.9.0.dist-info/METADATA,,\n"
                                 "kernels-0.9.0.dist-info/RECORD,,\n")


def _run(code: str, path: list) -> subprocess.CompletedProcess:
    prelude = f"import sys; sys.path[:0] = {[str(p) for p in path]!r}\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=path[-1])


def test_kernels_clash_ours_first(tmp_path):
    """Ours first on sys.path, the hub's installed too: `import kernels` fails naming the other one."""
    _fake_hub_kernels(tmp_path / "site")
    r = _run("import kernels", [ROOT, tmp_path / "site"])
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "distribution `kernels` 0.9.0" in last, r.stderr[-2000:]
    assert "pip uninstall kernels" in last


def test_kernels_clash_theirs_first(tmp_path):
    """The hub's first on sys.path (ours is never imported): `import gpt` fails naming it."""
    _fake_hub_kernels(tmp_path / "site")
    r = _run("import gpt", [tmp_path / "site", ROOT])
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "`kernels` 0.9.0" in last, r.stderr[-2000:]
    assert str(tmp_path / "site" / "kernels") in last
    r = _run("import kernels; assert kernels.HUB", [tmp_path / "site", ROOT])  # theirs alone still imports
    assert r.returncode == 0, r.stderr[-2000:]
