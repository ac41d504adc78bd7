"""The code the scripts share, kept honest: a function that two scripts define on purpose (una_loss in both UNA
scripts, dpo_loss in dpo.py and tr_dpo.py, update_reference in tr_dpo.py and kto.py, ...) is the same text in
each, and no file but tools/ and tests/ imports an algorithm script, with no import circle. Read from the source
(ast), so that these checks import nothing."""

import ast
from collections import defaultdict

from conftest import REPO

SKIPPED = ("tools", "tests")  # they may import the scripts (tools/bench.py reads their Args)


def source_files():
    """Every .py file of the repository outside tools/ and tests/, by module name (toy/evaluate.py: toy.evaluate)."""
    files = {}
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[0] in SKIPPED or any(part.startswith(".") for part in parts):
            continue
        files[".".join(p for p in parts if p != "__init__") or parts[0]] = path
    return files


def algorithm_scripts(files):
    """The modules that are scripts: they run as `python X.py` (an `if __name__ == "__main__":` block)."""
    return {name for name, path in files.items() if 'if __name__ == "__main__":' in path.read_text()}


def imports_of(path, modules):
    """The repository's modules that a file imports, anywhere in it (inside functions and if blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]  # from toy import task
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph():
    files = source_files()
    return files, {name: imports_of(path, files) for name, path in files.items()}


def find_cycle(graph):
    """One import circle as a list of modules [a, b, ..., a], or None."""
    state = {}  # module -> "open" while its imports are being visited, "done" after

    def visit(module, trail):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return trail + [module, imported]
            if imported not in state:
                cycle = visit(imported, trail + [module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        cycle = visit(module, []) if module not in state else None
        if cycle:
            return cycle[cycle.index(cycle[-1]):]
    return None


def test_no_file_imports_an_algorithm_script():
    files, graph = import_graph()
    scripts = algorithm_scripts(files)
    assert {"dpo", "tr_dpo", "kto", "sft", "ppo", "grpo", "una_offline", "una_online", "evaluate"} <= scripts
    assert {"common", "toy.evaluate", "toy.task"} <= set(files) - scripts  # the modules they may import
    offenders = {name: sorted(graph[name] & scripts) for name in graph if graph[name] & scripts}
    assert offenders == {}, f"these files import algorithm scripts (move the shared code to common.py): {offenders}"


def test_the_import_graph_has_no_circle():
    _, graph = import_graph()
    assert "common" in graph["una_online"] and "common" in graph["toy.evaluate"]  # the graph sees the imports
    assert graph["common"] == set()  # the shared module imports no other file of the repository
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_find_cycle_on_a_made_up_graph():
    # the checker itself: a circle through three modules is found, a chain is not
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def shared_definitions():
    """{function name: {script: its source}} for every top-level function defined in more than one script."""
    files = source_files()
    definitions = defaultdict(dict)
    for name in sorted(algorithm_scripts(files)):
        text = files[name].read_text()
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef):
                definitions[node.name][name] = ast.get_source_segment(text, node)
    return {function: sources for function, sources in definitions.items() if len(sources) > 1}


def test_functions_two_scripts_share_are_the_same_text():
    shared = shared_definitions()
    # the copies the scripts hold on purpose; a new one is checked as soon as a second script defines it
    expected = {
        "una_loss": {"una_offline", "una_online"},
        "forward_completions": {"kto", "una_offline", "una_online"},
        "dpo_loss": {"dpo", "tr_dpo"},
        "forward_pairs": {"dpo", "tr_dpo"},
        "update_reference": {"tr_dpo", "kto"},
        "token_logps": {"ppo", "grpo"},
    }
    for function, scripts in expected.items():
        assert set(shared.get(function, {})) == scripts, f"{function} is expected in {sorted(scripts)}"
    drifted = {function: sorted(sources) for function, sources in shared.items() if len(set(sources.values())) > 1}
    assert drifted == {}, f"copies that differ (make each the same text, as the scripts copy each other): {drifted}"
