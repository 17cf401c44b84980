import torch

from metanas_ray.config import ModelConfig
from metanas_ray.genotype import Genotype, derive, hard_mixture
from metanas_ray.search_space import edges, init_alphas, mixture, node_edges

OPS = ModelConfig().ops


def _alphas(nodes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = init_alphas(ModelConfig(nodes=nodes), g)
    return {k: torch.randn(v.shape, generator=g) for k, v in a.items()}


def test_derive_keeps_the_strongest_op_and_two_inputs():
    alphas = _alphas()
    geno = derive(alphas, OPS, 3)
    assert set(geno.cells) == {"normal", "reduce"}
    for t, cell in geno.cells.items():
        assert len(cell) == 3
        for node, own in zip(cell, node_edges(3)):
            assert len(node) == 2 and all(0 <= i < len(own) for _, i in node)
            for op, i in node:
                assert op == OPS[int(alphas[f"alpha_{t}"][own[i]].argmax())]


def test_beta_decides_which_inputs_survive():
    alphas = _alphas()
    alphas["beta_normal"] = torch.full_like(alphas["beta_normal"], -10.0)
    alphas["beta_normal"][0] = alphas["beta_normal"][1] = 10.0  # node 0 keeps inputs 0 and 1
    alphas["beta_normal"][2 + 1] = alphas["beta_normal"][2 + 2] = 10.0  # node 1 keeps c_{k-1} and node 0
    cell = derive(alphas, OPS, 3).cells["normal"]
    assert [i for _, i in cell[0]] == [0, 1] and [i for _, i in cell[1]] == [1, 2]


def test_genotype_json_round_trip(tmp_path):
    geno = derive(_alphas(nodes=4, seed=3), OPS, 4)
    geno.save(tmp_path / "genotype.json")
    assert Genotype.load(tmp_path / "genotype.json") == geno
    assert '"normal_concat": [\n    2,\n    3,\n    4,\n    5\n  ]' in geno.to_json()


def test_hard_mixture_is_the_soft_mixture_restricted_to_the_genotype():
    alphas = _alphas()
    soft = mixture(alphas, 0.5, 0.5, 3)
    hard = hard_mixture(alphas, OPS, 3, (0.5, 0.5))
    geno = derive(alphas, OPS, 3)
    index = {e: n for n, e in enumerate(edges(3))}
    for t in hard:
        kept = {(index[(j, i)], OPS.index(op)) for j, node in enumerate(geno.cells[t]) for op, i in node}
        nz = {tuple(x) for x in hard[t].nonzero().tolist()}
        assert nz == kept
        for e, o in kept:
            assert hard[t][e, o] == soft[t][e, o]


# genotype_metanas_og_v2, the Omniglot cells published in boschresearch/metanas, metanas/utils/genotypes.py
OG_V2 = Genotype({"normal": [[("dil_conv_3x3", 0), ("sep_conv_3x3", 1)], [("avg_pool_3x3", 0), ("sep_conv_3x3", 1)],
                             [("conv_1x5_5x1", 0), ("conv_3x3", 2)]],
                  "reduce": [[("skip_connect", 0), ("sep_conv_3x3", 1)], [("conv_3x3", 0), ("dil_conv_3x3", 1)],
                             [("dil_conv_3x3", 0), ("conv_1x5_5x1", 2)]]}, nodes=3)


def test_the_official_notation_reads_back_as_the_official_namedtuple():
    from collections import namedtuple
    official = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")
    text = OG_V2.to_official()
    assert text.startswith('Genotype(normal=[[("dil_conv_3x3", 0), ("sep_conv_3x3", 1)], ')
    parsed = eval(text, {"Genotype": official, "range": range})  # what pasting it into the official code gives
    assert parsed.normal == [[tuple(e) for e in node] for node in OG_V2.cells["normal"]]
    assert parsed.reduce == [[tuple(e) for e in node] for node in OG_V2.cells["reduce"]]
    assert parsed.normal_concat == parsed.reduce_concat == range(2, 5)


def test_a_cell_as_dot_has_one_labelled_arrow_per_kept_edge_and_renders_where_dot_is_installed(tmp_path, monkeypatch):
    dot = OG_V2.to_dot("reduce")
    assert dot.startswith("digraph cell_reduce {") and dot.rstrip().endswith("}")
    assert '"c_{k-2}" -> "0" [label="skip_connect"];' in dot and '"c_{k-2}" -> "2" [label="dil_conv_3x3"];' in dot
    assert '"0" -> "2" [label="conv_1x5_5x1"];' in dot  # input 2 is node 0
    assert dot.count("[label=") == 6 and dot.count('-> "c_{k}"') == 3
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert [p.name for p in OG_V2.write_dot(tmp_path)] == ["cell_normal.dot", "cell_reduce.dot"]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dot").write_text('#!/bin/sh\n# a stand-in for Graphviz: dot -Tsvg IN -o OUT\necho "<svg/>" > "$4"\n')
    (fake / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    written = [p.name for p in OG_V2.write_dot(tmp_path)]
    assert written == ["cell_normal.dot", "cell_normal.svg", "cell_reduce.dot", "cell_reduce.svg"]
