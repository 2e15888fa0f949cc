"""The package's shape, as docs/architecture.md describes it: imports go one way (no cycle), and only the
coefficient space (besides the transform modules) turns coefficients into matrices or computes index sets."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_spectral"
# the pure transform modules, and the coefficient space that uses them
TRANSFORM_MODULES = {"hf_spectral.dct", "hf_spectral.bases", "hf_spectral.fft_tables", "hf_spectral.triton_kernels"}
# what builds a basis, scatters coefficients into a matrix, or chooses an index set
MATRIX_BUILDERS = {
    "dct_basis", "basis_matrix",
    "random_orthonormal_basis", "idct_lastdim", "select_indices", "lowfreq_block",
    "random_indices", "triangle_indices", "energy_indices", "banded_indices",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _imports(name: str, tree: ast.Module, is_package: bool) -> dict[str, set[str]]:
    """{imported hf_spectral module: names taken from it}, for every import in the file (lazy ones too)."""
    found: dict[str, set[str]] = {}
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_spectral":
                continue
            names = {alias.name for alias in node.names}
            found.setdefault(target, set()).update(names)
            for alias in names:  # `from . import dct` imports the module hf_spectral.dct
                found.setdefault(f"{target}.{alias}", set())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hf_spectral":
                    found.setdefault(alias.name, set())
    return found


def _graph() -> dict[str, dict[str, set[str]]]:
    modules = _modules()
    graph = {}
    for name, tree in modules.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
        graph[name] = {t: n for t, n in _imports(name, tree, is_package).items() if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle of the code itself
    edges = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_only_the_coefficient_space_turns_coefficients_into_matrices():
    offenders = {}
    for name, targets in _graph().items():
        if name in TRANSFORM_MODULES or name == "hf_spectral.coefficient_space":
            continue
        used = set().union(*targets.values()) & MATRIX_BUILDERS if targets else set()
        if used:
            offenders[name] = sorted(used)
    assert not offenders, offenders


def test_the_checks_see_a_real_import():
    # the two tests above would pass vacuously if the parser missed imports
    graph = _graph()
    assert "hf_spectral.coefficient_space" in graph["hf_spectral.layer"]
    assert "make_space" in graph["hf_spectral.layer"]["hf_spectral.coefficient_space"]
    assert "hf_spectral.fft_tables" in graph["hf_spectral.dct"]
    assert "hf_spectral.fft_tables" in graph["hf_spectral.triton_kernels"]


# -- docs/architecture.md's list of imports is the code's --------------------------------------------------

DOC = PACKAGE.parent / "docs" / "architecture.md"
COLLAPSED = ("hf_spectral.cli", "hf_spectral.mixing")  # subpackages the page shows as one node each


def _node(module: str) -> str:
    for package in COLLAPSED:
        if module == package or module.startswith(package + "."):
            return package.removeprefix("hf_spectral.")
    return module.removeprefix("hf_spectral.") or "hf_spectral"


def _module_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, as the page names them: `from . import x` is an import of
    the module x (not of the package around it), and cli/ and mixing/ are one node each."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
        imports = _imports(name, tree, is_package)
        targets = set()
        for target, names in imports.items():
            if target not in modules or target == name:
                continue
            if names and all(f"{target}.{n}" in modules for n in names):
                continue  # only submodules taken from it: their own entries count
            targets.add(target)
        graph.setdefault(_node(name), set()).update(
            _node(t) for t in targets if _node(t) != _node(name) and not name.startswith(t + ".")
        )
    return graph


def _documented_graph() -> dict[str, set[str]]:
    """The bullet list under "Imports go one way" in docs/architecture.md: "- `a`, `b`: `x`, `y`" says that a
    and b each import exactly x and y of the package; "nothing of the package" is the empty set."""
    text = DOC.read_text()
    section = text[text.index("Imports go one way"):]
    section = section[: section.index("\n\n", section.index("\n- "))]
    graph: dict[str, set[str]] = {}
    for line in section.splitlines():
        if not line.startswith("- "):
            continue
        left, _, right = line[2:].partition(": ")
        names = {n.strip(" `") for n in left.split(",")}
        targets = set() if right.strip().startswith("nothing") else {n.strip(" `.") for n in right.split(",")}
        for name in names:
            assert name not in graph, f"{name} is listed twice in {DOC.name}"
            graph[name] = targets
    return graph


def test_the_documented_imports_are_the_real_imports():
    real, documented = _module_graph(), _documented_graph()
    missing = sorted(set(real) - set(documented))
    unknown = sorted(set(documented) - set(real))
    wrong = {m: {"undocumented": sorted(real[m] - documented[m]), "not imported": sorted(documented[m] - real[m])}
             for m in set(real) & set(documented) if real[m] != documented[m]}
    assert not (missing or unknown or wrong), (
        f"docs/architecture.md's import list differs from the code: modules not listed {missing}, listed but absent "
        f"{unknown}, wrong lines {wrong}"
    )


def test_the_documented_list_sees_an_added_import(monkeypatch):
    # the comparison above would pass vacuously if either side were empty or the parser missed an import
    real = _module_graph()
    assert "coefficient_space" in real["layer"] and len(_documented_graph()) == len(real)
    original = _modules

    def with_an_extra_import():
        modules = original()
        modules["hf_spectral.stable_random"].body.append(ast.parse("from .layer import SpectralLayer").body[0])
        return modules

    monkeypatch.setattr(__import__(__name__), "_modules", with_an_extra_import)
    assert "layer" in _module_graph()["stable_random"] and _module_graph() != _documented_graph()
