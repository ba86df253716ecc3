"""The package's shape: its import graph (function-local imports included) has no cycle
and no two folders importing each other, and the loop and the checkpointer name no
method (``scripts/import_graph.py`` prints the graph)."""

from __future__ import annotations

import os
import re
import sys

from cpt_jax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import import_graph  # noqa: E402


def test_the_import_graph_holds():
    s = import_graph.summary(import_graph.graph())
    assert s["cycles"] == []
    assert s["mutual_folders"] == []
    assert len(s["local_imports"]) <= import_graph.MAX_LOCAL, s["local_imports"]
    assert import_graph.main(["--check"]) == 0


def test_the_analysis_finds_what_it_must():
    """Planted faults: a three-module cycle through a function-local import, a pair of
    folders importing each other, and a TYPE_CHECKING import that is no edge."""
    edges = {"cpt_jax.a.x": [("cpt_jax.b.y", False, 1)],
             "cpt_jax.b.y": [("cpt_jax.c", True, 5)],
             "cpt_jax.c": [("cpt_jax.a.x", False, 2)]}
    s = import_graph.summary(edges)
    assert s["cycles"] == [["cpt_jax.a.x", "cpt_jax.b.y", "cpt_jax.c"]]
    assert s["local_imports"] == ["cpt_jax.b.y:5 -> cpt_jax.c"]
    assert import_graph.mutual_folders({"cpt_jax.a.x": [("cpt_jax.b.y", False, 1)],
                                        "cpt_jax.b.z": [("cpt_jax.a.w", True, 3)]}
                                       ) == [("a", "b")]
    assert import_graph.cycles({"cpt_jax.a.x": [("cpt_jax.b.y", False, 1)],
                                "cpt_jax.b.y": []}) == []


def test_type_checking_imports_are_not_edges(tmp_path, monkeypatch):
    pkg = tmp_path / "cpt_jax"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "m.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cpt_jax.b import n\n"
        "def f():\n    from cpt_jax import c\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("")
    monkeypatch.setattr(import_graph, "ROOT", pkg)
    edges = import_graph.graph()
    assert edges["cpt_jax.a.m"] == [("cpt_jax.c", True, 5)]


def test_the_loop_and_the_checkpointer_name_no_method():
    names = [n for n in methods.REGISTRY if n != "replay"]  # replay is also the data path
    assert {"der", "ewc", "reptile", "distill", "agem", "l2"} <= set(names)
    for rel in ("cpt_jax/train/loop.py", "cpt_jax/train/checkpoint.py"):
        text = open(os.path.join(ROOT, rel)).read()
        for n in names:
            assert not re.search(rf"\b{n}\b", text, re.IGNORECASE), (rel, n)
