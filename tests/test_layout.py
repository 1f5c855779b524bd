"""The package's layout rules, checked on the source tree."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The harness (specedge/tools/): what each module was called before it moved there, too.
HARNESS = {"bench", "bench_draft", "bench_verifier", "bench_engines", "faults", "soak", "fuzz", "channel", "demo"}
# The only modules outside the harness allowed to import it: the CLI's command table, the GPU check.
ALLOWED = {ROOT / "specedge" / "cli.py", ROOT / "specedge" / "gpu_check.py"}


def _product_files() -> list[Path]:
    files = []
    for folder in ("specedge", "device", "cloud", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in ALLOWED or (ROOT / "specedge" / "tools") in path.parents:
                continue
            files.append(path)
    return files


def _harness_name(module: str) -> bool:
    """`specedge.tools[...]`, or a harness module by its old place (`specedge.bench`)."""
    parts = module.split(".")
    return parts[:2] == ["specedge", "tools"] or (parts[0] == "specedge" and len(parts) > 1 and parts[1] in HARNESS)


def harness_imports(path: Path) -> list[str]:
    """Every import of the harness in one file, as `path:line: statement`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if _harness_name(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # a relative import: resolve it against the file's package
                package = path.relative_to(ROOT).parent.parts
                package = ("specedge",) + package[1:] if package[:1] == ("specedge",) else ("specedge",) + package
                base = list(package[:len(package) - node.level + 1])
                module = ".".join(base + ([module] if module else []))
            if _harness_name(module):
                names = [module]
            elif module in ("specedge", "specedge.tools"):  # `from specedge import bench`
                names = [f"{module}.{alias.name}" for alias in node.names if alias.name in HARNESS | {"tools"}]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}" for name in names]
    return found


def test_no_product_module_imports_the_harness():
    files = _product_files()
    assert len(files) > 20  # the walk found the product
    found = [hit for path in files for hit in harness_imports(path)]
    assert not found, "product modules import the harness (specedge/tools/):\n" + "\n".join(found)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module's code (docstrings left out: they may name a topic)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_only_the_topics_module_spells_a_topic():
    """Every topic is built and parsed by specedge/protocol/topics.py (issue 21): no other module,
    the harness included, writes the topic root."""
    topics_module = ROOT / "specedge" / "protocol" / "topics.py"
    found = []
    for folder in ("specedge", "device", "cloud"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != topics_module:
                found += [f"{path.relative_to(ROOT)}:{line}" for line, text in _code_strings(path)
                          if "specedge/v1" in text or "specedge/local" in text or "_verifiers" in text
                          or text.startswith("sv/")]
    assert not found, found


# The source folder of each package (pyproject's package-dir).
PACKAGES = {"specedge": "specedge", "device": "specedge.device", "cloud": "specedge.cloud", "kernels": "specedge.kernels"}


def import_graph() -> dict[str, set[str]]:
    """module -> the product modules it imports, at the top or inside a function alike (an import
    inside a function is a loop deferred, not a loop gone)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package] + parts)] = path

    def known(name: str) -> str:  # `from specedge.cloud import engine` names a module, or a module's name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {known(n) for n in names if n.startswith("specedge")} - {module, ""}
        graph[module] = edges
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_loop_remains_not_even_through_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 60 and "specedge.cloud.verifier" in graph["specedge.cloud.serve"]  # the walk found it
    assert not loops(graph), loops(graph)


def test_the_loop_finder_finds_a_loop_through_a_function_level_import():
    graph = import_graph()
    graph["specedge.cloud.engine"].add("specedge.cloud.llama_target")  # open_engine's old home
    assert ["specedge.cloud.engine", "specedge.cloud.llama_target"] in loops(graph)


def test_config_imports_only_the_protocol():
    """config.py checks shapes and ranges: it may read the wire's limits (protocol/, a leaf), and
    nothing else of the product, which all reads config."""
    assert import_graph()["specedge.config"] <= {"specedge.protocol", "specedge.protocol.wire"}


def test_the_protocol_is_a_leaf():
    """specedge/protocol/ imports nothing of the product but itself and the pure math whose values
    it carries (specedge.speculative): not device/, cloud/, the harness, config or grammar (which
    import it), so that nothing it needs can import it back."""
    found = [f"{module}: {name}" for module, names in import_graph().items() if module.startswith("specedge.protocol")
             for name in names if not name.startswith(("specedge.protocol", "specedge.speculative"))]
    assert not found, found


MAX_FUNCTION_LINES = 60


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method in one file longer than `limit` lines (its def line to its last),
    as `path:line: name (N lines)`; `add_parser` functions (argument tables) are left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "add_parser":
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} ({length} lines)")
    return found


def test_no_function_is_over_60_lines():
    """Long functions are split into named steps (issues 21 and 37): every function and method of
    the product and the harness fits in 60 lines, argument tables (`add_parser`) excepted."""
    files = [path for folder in ("specedge", "device", "cloud", "kernels")
             for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20  # the walk found the product
    found = [hit for path in files for hit in long_functions(path)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


MAX_CLASS_LINES = 400


def test_no_class_is_over_400_lines():
    """A class past 400 lines owns more than one kind of state (issue 37 split the verifier's
    session table and the device's request out of theirs): every class of the product and the
    harness fits in 400 lines."""
    found = []
    for folder in ("specedge", "device", "cloud", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
                      and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert not found, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(found)


AGENT_INSIDES = {"link", "scheduler", "meter"}


def agent_reach_throughs(path: Path) -> list[str]:
    """Every `agent.link`, `agent.scheduler` or `agent.meter` in one file (`x.agent.link` too), as
    `path:line: expression`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in AGENT_INSIDES:
            owner = node.value  # `agent` or `<anything>.agent`
            if getattr(owner, "id", None) == "agent" or getattr(owner, "attr", None) == "agent":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_reaches_through_the_agent():
    """The device node owns the Link and the agent offers a status() snapshot (issue 21): no
    module but the agent's own (device/agent.py, and device/request.py, its requests), the
    harness and the tests included, reads the agent's link, scheduler or meter."""
    own = {ROOT / "device" / "agent.py", ROOT / "device" / "request.py"}
    files = [path for folder in ("specedge", "device", "cloud", "kernels", "tests")
             for path in sorted((ROOT / folder).rglob("*.py")) if path not in own]
    assert len(files) > 20  # the walk found the product
    found = [hit for path in files for hit in agent_reach_throughs(path)]
    assert not found, "reaches through the agent (use Agent.status() or the node's link):\n" + "\n".join(found)
