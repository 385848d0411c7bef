"""DependencyGraph files (JSON, GraphML, DOT) round-trip through networkx and graphviz, loading
validates; clustering across classes: valid Ward linkage, bag-of-nodes vectors and shared()
by set intersection; pictures by dot and by matplotlib."""

import json
import shutil
import subprocess

import networkx as nx
import numpy as np
import pytest
from scipy.cluster.hierarchy import is_valid_linkage, linkage

from nchains.ssa import DependencyGraph, render, ssa_clusters

LAYERS = ["c1", "c2", "c3", "fc"]
LABELS = {"c1": "L1", "c2": "L2", "c3": "L3", "fc": "FC"}


def make_graph(target, edges, num_images=10, class_name=None):
    """A graph from ``[(upper, lower, frequency, relevance)]``."""
    nodes = {("fc", target)} | {lo for _, lo, _, _ in edges}
    rank = {n: i for i, n in enumerate(LAYERS)}
    return DependencyGraph(
        nodes=sorted(nodes, key=lambda n: (rank[n[0]], n[1])),
        edges=sorted([(u, lo, f) for u, lo, f, _ in edges], key=lambda e: (rank[e[0][0]], e[0][1], rank[e[1][0]],
                                                                            e[1][1])),
        relevance={(u, lo): r for u, lo, _, r in edges}, target=target, classifier="fc", layers=LAYERS,
        labels=LABELS, images_hash="ab" * 32, num_images=num_images, branching=2, response="mean",
        class_name=class_name)


@pytest.fixture
def graph():
    return make_graph(1, [(("fc", 1), ("c3", 4), 9, 0.25), (("fc", 1), ("c3", 0), 3, 0.125),
                          (("c3", 4), ("c2", 2), 7, 1.5e-3), (("c3", 0), ("c2", 2), 2, -0.75),
                          (("c2", 2), ("c1", 5), 10, 1 / 3)], class_name="shirt")


def test_json_round_trip(graph, tmp_path):
    graph.save(tmp_path / "g.json")
    back = DependencyGraph.load(tmp_path / "g.json")
    assert back == graph and back.relevance == graph.relevance
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["format"] == "nchains-ssa-graph" and data["version"] == 1
    # any listing order loads to the canonical one
    data["nodes"].reverse()
    data["edges"].reverse()
    assert DependencyGraph.from_dict(data) == graph


def test_graphml_round_trip_through_networkx(graph, tmp_path):
    graph.save(tmp_path / "g.graphml")
    assert DependencyGraph.load(tmp_path / "g.graphml") == graph
    read = nx.read_graphml(tmp_path / "g.graphml")
    ours = graph.to_networkx()
    assert set(read.nodes) == set(ours.nodes) == {f"{n[0]}:{n[1]}" for n in graph.nodes}
    assert {(u, v, d["frequency"]) for u, v, d in read.edges(data=True)} == \
        {(f"{u[0]}:{u[1]}", f"{lo[0]}:{lo[1]}", f) for u, lo, f in graph.edges}
    assert read.nodes["c2:2"]["label"] == "L2_2" and read.nodes["c2:2"]["frequency"] == 7
    assert read.graph["target"] == 1 and read.graph["class_name"] == "shirt"


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_dot_file_parses_with_graphviz(graph, tmp_path):
    graph.save(tmp_path / "g.dot")
    out = subprocess.run(["dot", "-Tjson", str(tmp_path / "g.dot")], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    names = [o["name"] for o in data["objects"] if "nodes" not in o and "subgraphs" not in o]
    assert sorted(n for n in names if not n.startswith("row:")) == sorted(f"{n[0]}:{n[1]}" for n in graph.nodes)
    by_id = {o["_gvid"]: o["name"] for o in data["objects"]}
    got = {(by_id[e["tail"]], by_id[e["head"]], int(e["frequency"])) for e in data["edges"] if "frequency" in e}
    assert got == {(f"{u[0]}:{u[1]}", f"{lo[0]}:{lo[1]}", f) for u, lo, f in graph.edges}
    # one row (rank=same subgraph, headed by its layer's label) per layer with nodes, top first
    rows = [o for o in data["objects"] if "nodes" in o]
    assert [by_id[o["nodes"][0]] for o in rows] == ["row:fc", "row:c3", "row:c2", "row:c1"]
    chain = [(by_id[e["tail"]], by_id[e["head"]]) for e in data["edges"] if e.get("style") == "invis"]
    assert chain == [("row:fc", "row:c3"), ("row:c3", "row:c2"), ("row:c2", "row:c1")]


def test_loading_refuses_bad_fields(graph, tmp_path):
    good = graph.to_dict()
    cases = [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["edges"][0].update(frequency=11), "edges[0].frequency"),
        (lambda d: d["edges"][0].update(relevance=float("nan")), "edges[0].relevance"),
        (lambda d: d["edges"][0].update(lower=["c9", 0]), "not in layers"),
        (lambda d: d["edges"][0].update(lower=["c1", 77]), "is not in nodes"),
        (lambda d: d.update(images_hash="xyz"), "images_hash"),
        (lambda d: d["nodes"].append(["c1", 99]), "has no edge into it"),
        (lambda d: d["nodes"].remove(["fc", 1]), "root"),
        (lambda d: d.update(target=True), "target"),
        (lambda d: d["edges"].append(dict(d["edges"][0])), "twice"),
        (lambda d: d["edges"][0].update(upper=["c1", 5], lower=["fc", 1]), "does not come before"),
    ]
    for change, needle in cases:
        data = json.loads(json.dumps(good))
        change(data)
        with pytest.raises((ValueError, TypeError), match=None) as info:
            DependencyGraph.from_dict(data)
        assert needle in str(info.value), (needle, str(info.value))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        DependencyGraph.load(tmp_path / "bad.json")
    (tmp_path / "g.graphml").write_text("<graphml")
    with pytest.raises(ValueError, match="GraphML"):
        DependencyGraph.load(tmp_path / "g.graphml")
    with pytest.raises(ValueError, match=r"\.json, \.graphml"):
        graph.save(tmp_path / "g.txt")


def _classes():
    a = make_graph(0, [(("fc", 0), ("c3", 1), 10, 1.0), (("c3", 1), ("c2", 3), 5, 0.5),
                       (("c2", 3), ("c1", 0), 4, 0.1)])
    b = make_graph(1, [(("fc", 1), ("c3", 1), 8, 1.0), (("c3", 1), ("c2", 3), 6, 0.5),
                       (("c3", 1), ("c2", 0), 2, 0.2), (("c2", 3), ("c1", 2), 4, 0.1)])
    c = make_graph(2, [(("fc", 2), ("c3", 7), 9, 1.0), (("c3", 7), ("c2", 5), 9, 0.5)], num_images=20)
    return {"a": a, "b": b, "c": c}


def test_clusters_vectors_linkage_and_shared():
    graphs = _classes()
    cl = ssa_clusters(graphs)
    assert cl.labels == ["a", "b", "c"]
    want_nodes = sorted({n for g in graphs.values() for n in g.nodes if n[0] != "fc"},
                        key=lambda n: (LAYERS.index(n[0]), n[1]))
    assert cl.nodes == want_nodes
    for i, g in enumerate(graphs.values()):  # frequency / num_images, computed here from the edges
        for j, n in enumerate(cl.nodes):
            f = max([fr for _, lo, fr in g.edges if lo == n], default=0)
            assert cl.vectors[i, j] == pytest.approx(f / g.num_images)
    assert is_valid_linkage(cl.linkage) and cl.linkage.shape == (2, 4)
    np.testing.assert_allclose(cl.linkage, linkage(cl.vectors, method="ward"))
    assert {int(cl.linkage[0, 0]), int(cl.linkage[0, 1])} == {0, 1}  # a and b share most
    binary = ssa_clusters(graphs, weighting="binary")
    assert set(np.unique(binary.vectors)) == {0.0, 1.0}
    s = cl.shared("a", "b")
    na, nb = set(graphs["a"].nodes), set(graphs["b"].nodes)
    assert set(s.nodes) == {f"{n[0]}:{n[1]}" for n in na & nb}
    ea = {(u, lo) for u, lo, _ in graphs["a"].edges}
    eb = {(u, lo) for u, lo, _ in graphs["b"].edges}
    assert set(s.edges) == {(f"{u[0]}:{u[1]}", f"{lo[0]}:{lo[1]}") for u, lo in ea & eb}
    assert s.edges["c3:1", "c2:3"]["frequency"] == (5, 6)
    assert cl.shared("a", "c").number_of_nodes() == 0
    summary = cl.summary()
    assert summary["shared"][0] == {"classes": ["a", "b"], "nodes": 2, "edges": 1, "shared_nodes": ["L2_3", "L3_1"]}
    with pytest.raises(ValueError, match="one of the classes"):
        cl.shared("a", "zzz")


def test_clusters_refuse_bad_input():
    graphs = _classes()
    with pytest.raises(ValueError, match="at least two"):
        ssa_clusters({"a": graphs["a"]})
    with pytest.raises(ValueError, match="weighting"):
        ssa_clusters(graphs, weighting="tfidf")
    with pytest.raises(TypeError, match=r"graphs\['x'\]"):
        ssa_clusters({"a": graphs["a"], "x": 3})


def test_plots(tmp_path, graph):
    cl = ssa_clusters(_classes())
    cl.plot(tmp_path / "dendrogram.png")
    assert (tmp_path / "dendrogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render(graph, tmp_path / "m.svg", engine="matplotlib") == "matplotlib"
    text = (tmp_path / "m.svg").read_text()
    assert "<svg" in text and "L2_2" in text
    if shutil.which("dot"):
        assert render(graph, tmp_path / "d.svg", engine="dot") == "dot"
        text = (tmp_path / "d.svg").read_text()
        assert "<svg" in text and "L2_2" in text and "L1_5" in text
        assert render(graph, tmp_path / "auto.svg") == "dot"
    with pytest.raises(ValueError, match=".svg"):
        render(graph, tmp_path / "x.png")


def test_render_without_dot_falls_back_to_matplotlib(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert render(graph, tmp_path / "g.svg") == "matplotlib"
    assert "<svg" in (tmp_path / "g.svg").read_text()
    with pytest.raises(ValueError, match="graphviz"):
        render(graph, tmp_path / "h.svg", engine="dot")
