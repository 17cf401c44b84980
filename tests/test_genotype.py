import torch

from metanas_ray.config import ModelConfig
from metanas_ray.genotype import Genotype, derive, hard_mixture
from metanas_ray.search_space import edges, init_alphas, mixture

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
        start = 0
        for j, node in enumerate(cell):
            assert len(node) == 2 and all(0 <= i < j + 2 for _, i in node)
            for op, i in node:
                assert op == OPS[int(alphas[f"alpha_{t}"][start + i].argmax())]
            start += j + 2


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
