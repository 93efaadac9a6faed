"""The network as a graph of its agents (for ``render`` and ``env.to_networkx()``), read from the
network's public attributes."""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from torch import nn

from agentnet.network import WorkerNetwork

__all__ = ["draw", "worker_graph"]


def worker_graph(model: WorkerNetwork, roles: list[list[str]] | None = None, leadership: list[torch.Tensor] | None = None) -> nx.DiGraph:
    """Workers as nodes (``layer``, ``index``, ``role``, ``leadership`` count), plus ``input``, a
    ``plain_<block>`` node per block's plain layers, and the output agent; edges carry the Frobenius
    norm of the weight block connecting two workers (the first replica's). Node names match the
    PettingZoo agents (``worker_<i>``, output last)."""
    R = model.replicas
    graph = nx.DiGraph()
    graph.add_node("input", layer=0, index=0, role="input", leadership=0.0)
    previous = ["input"]
    agent = 0
    with torch.no_grad():
        for li, layer in enumerate(model.hidden):
            previous = _plain_node(graph, model.stems[li], li, previous, R)
            names = []
            for w in range(layer.num_workers):
                name = f"worker_{agent}"
                agent += 1
                role = roles[li][w] if roles else "worker"
                lead = float(leadership[li].reshape(-1, layer.num_workers)[0, w]) if leadership is not None else 0.0
                graph.add_node(name, layer=li + 1, index=w, role=role, leadership=lead)
                names.append(name)
            # The weight reading the layer's input, rows grouped by worker and input columns by the
            # previous layer's workers (FC, conv channels and flattened maps are all worker-major).
            weight = layer.input_weight
            weight = weight[: weight.shape[0] // R]
            if previous[0].startswith(("input", "plain")):  # no worker structure in the columns
                norms = weight.reshape(layer.num_workers, -1).norm(dim=1).view(-1, 1).expand(-1, len(previous))
            else:
                norms = weight.reshape(layer.num_workers, weight.shape[0] // layer.num_workers, len(previous), -1).norm(dim=(1, 3))
            for j, dst in enumerate(names):
                for i, src in enumerate(previous):
                    graph.add_edge(src, dst, weight=float(norms[j, i]))
            previous = names
        previous = _plain_node(graph, model.stems[-1], len(model.hidden), previous, R)
        out = model.output
        graph.add_node(f"worker_{agent}", layer=len(model.hidden) + 1, index=0, role="output", leadership=0.0)
        if previous[0].startswith("plain"):
            norms = out.weight[: out.out_features].norm().view(1)
        else:
            norms = out.weight[: out.out_features].view(out.out_features, len(previous), -1).norm(dim=(0, 2))
        for i, src in enumerate(previous):
            graph.add_edge(src, f"worker_{agent}", weight=float(norms[i]))
    return graph


def _plain_node(graph: nx.DiGraph, stem: nn.Module, block: int, previous: list[str], replicas: int) -> list[str]:
    """A block's plain layers as one node ``plain_<block>`` (edges: the first plain weight's norm,
    replica 0); returns the nodes that feed the block's worker layer."""
    if not len(stem.layers):
        return previous
    name = f"plain_{block}"
    weight = stem.layers[0].input_weight
    graph.add_node(name, layer=block + 0.5, index=0, role="plain", leadership=0.0)
    for src in previous:
        graph.add_edge(src, name, weight=float(weight[: weight.shape[0] // replicas].norm()) / len(previous))
    return [name]


def draw(graph: nx.DiGraph, title: str) -> np.ndarray:
    """The graph as an RGB image: columns by layer, roles coloured, edge widths by weight norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = {}
    for layer in {d["layer"] for _, d in graph.nodes(data=True)}:  # columns by layer, centred
        members = [n for n, d in graph.nodes(data=True) if d["layer"] == layer]
        for j, n in enumerate(members):
            pos[n] = (layer, (len(members) - 1) / 2 - j)
    colours = {"leader": "tab:red", "follower": "tab:blue", "worker": "tab:gray", "input": "black", "output": "tab:green",
               "plain": "tab:olive"}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    widths = np.array([d["weight"] for _, _, d in graph.edges(data=True)])
    widths = 0.2 + 1.5 * widths / widths.max() if len(widths) and widths.max() > 0 else 0.5
    nx.draw_networkx_edges(graph, pos, ax=ax, width=widths, alpha=0.3, arrows=False)
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=60, node_color=[colours[d["role"]] for _, d in graph.nodes(data=True)])
    ax.set_title(title)
    ax.axis("off")
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
