"""The README's map of the code is true: every file in its table, the imports it states (read from the code with
an AST walk, imports inside functions included), no import circle, no trainer that loads a reward model, no file
over 600 lines. Under a second.

    python -m pytest -q tests/test_layout.py
"""
import ast
import os
import re

from conftest import ROOT

MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
TRAINERS = ("train_dpo", "train_kto")


def imports(module):
    """The repository modules a root module imports, anywhere in it."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return (found & set(MODULES)) - {module}


GRAPH = {m: imports(m) for m in MODULES}


def closure(module):
    seen, todo = set(), [module]
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def names(text):
    return [n.removesuffix(".py") for n in re.findall(r"`([\w.]+)`", text)]


def test_no_import_circle_and_no_trainer_loads_a_reward_model():
    for m in MODULES:
        assert m not in closure(m), f"{m} imports itself through {sorted(closure(m))}"
    for trainer in TRAINERS:
        assert not closure(trainer) & {"scorers", "reward_models", "evaluate", "label", "filter_fifa"}, trainer


def test_the_reading_map_names_what_the_trainers_import():
    text = " ".join(readme().split())
    calls = names(re.search(r"What they call is in (.*?); the functions to open first", text).group(1))
    assert set(calls) == (GRAPH["train_dpo"] | GRAPH["train_kto"]) - {"losses"}
    chains = re.search(r"Imports go one way \((.*?)\): no circle", text).group(1).split("; ")
    trainers = [c for c in chains if c.startswith("the trainers import")]
    assert len(trainers) == 1 and all(GRAPH[t] == set(names(trainers[0])) for t in TRAINERS)
    for chain in chains:
        if chain in trainers:
            continue
        groups = [names(g) for g in chain.split(" <- ")]  # `a`, `b` <- `c`: c imports a and b
        for imported, importers in zip(groups, groups[1:]):
            for m in importers:
                assert set(imported) <= GRAPH[m], f"README says {m} imports {imported}; it imports {sorted(GRAPH[m])}"


def test_every_file_is_in_the_table_and_none_is_over_600_lines():
    table = readme().split("| role | file | what it is |")[1].split("\n\n")[0]
    for m in MODULES:
        assert f"`{m}.py`" in table, f"{m}.py is not in the README's file table"
        with open(os.path.join(ROOT, m + ".py")) as f:
            assert len(f.read().splitlines()) <= 600, f"{m}.py is over 600 lines"
