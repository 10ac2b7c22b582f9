"""The program's views: printout, networkx graph, parameter table, and the CLI that shows them."""

from __future__ import annotations

import textwrap

import networkx as nx
import torch

import tplimits as tpl
from tplimits.cli import main


def test_graph_matches_instructions():
    prog = tpl.lower("mlp", depth=2)
    g = prog.graph
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == {ins.name for ins in prog}
    for ins in prog:
        assert set(g.predecessors(ins.name)) == set(ins.inputs)
    kinds = nx.get_node_attributes(g, "instruction")
    assert sorted(set(kinds.values())) == ["Avg", "Input", "MatMul", "Nonlin", "Parameter"]
    outputs = [n for n, out in g.nodes(data="output") if out]
    assert outputs == prog.outputs


def test_printout_and_table():
    prog = tpl.lower("transformer", n_layers=1)
    text = prog.format(origins=True)
    assert all(f"%{ins.name}" in text for ins in prog)
    assert "regroup" in text and "[blocks of 1/4n]" in text  # heads split out of d_model
    assert "transformer.py" in text  # source lines of the user's code
    table = prog.parameter_table()
    assert "blocks.0.mlp.fc_in.weight" in table and "[4n, n]" in table
    assert len(table.splitlines()) == len(prog.parameters) + 2


def test_cli_inspect_registered(capsys):
    assert main(["inspect", "mlp", "-o", "depth=2", "-o", "activation='relu'"]) == 0
    out = capsys.readouterr().out
    assert "matmul %layers_1_weight" in out and "relu" in out
    assert "layers.1.weight  matrix" in out


def test_cli_inspect_file(tmp_path, capsys):
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent("""
        import torch
        def build(width):
            return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        def inputs():
            return (torch.randn(2, 3),)
    """))
    assert main(["inspect", f"{path}:build", "--inputs", f"{path}:inputs", "--width", "16"]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "n^1 · avg" in out


def test_cli_bad_target(capsys):
    assert main(["inspect", "no-such-thing"]) == 2
    assert "registered architecture" in capsys.readouterr().err


def test_replay_keeps_output_structure():
    class Pair(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.a = torch.nn.Linear(3, width)
            self.b = torch.nn.Linear(width, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return {"out": self.b(h), "hidden": h}

    prog = tpl.lower(Pair, example_inputs=(torch.randn(2, 3),), width=8)
    model = Pair(20)
    x = torch.randn(4, 3)
    got, ref = prog.replay(model, x), model(x)
    assert set(got) == {"out", "hidden"}
    torch.testing.assert_close(got["hidden"], ref["hidden"], rtol=1e-12, atol=0)
