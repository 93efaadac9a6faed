"""``predsim`` (Nøkland & Eidnes 2019): every block trained by ``(1 - beta)`` its head's cross-entropy
plus ``beta`` its similarity-matching loss, nothing crossing a block boundary; the similarity term
equals its definition per replica (FC and conv); ``beta = 0`` is ``lg_bp``; it learns real MNIST;
populations, checkpoints and the CL methods work with it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from agentnet.composition import to_run_config
from agentnet.config import ConvLayerConfig, ModelConfig
from agentnet.network import WorkerNetwork, build_model
from agentnet.recipes import train
from agentnet.registry import STRATEGIES, build_strategy
from strategies.lg_bp import head_inputs, head_losses
from strategies.predsim import PredSim, similarity_losses
from tests.conftest import compose_config
from tests.test_layer_kinds import assert_isolated, batch, blocks, mixed_model
from tests.test_dfa import CL_METHODS, check_cl_method_composes, tiny_batch, tiny_mlp
from tests.test_population import FILTER_CONV, MIXED, _data, _max_relative_error, _trained


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(p: torch.Tensor, r: int, R: int) -> torch.Tensor:
    n = p.shape[0] // R
    return p[r * n : (r + 1) * n]


def cosine_by_hand(v: torch.Tensor) -> torch.Tensor:
    """The paper's S for one replica ``(B, n)``: rows centred, unit length, all pairwise products."""
    c = v - v.mean(1, keepdim=True)
    c = c / (1e-8 + c.norm(dim=1, keepdim=True))
    return (c @ c.T).clamp(-1, 1)


def step_grads(node, model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    strategy = build_strategy(node, model)
    strategy.backward(strategy.compute(x, y))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_registered_configurable_and_checked():
    assert STRATEGIES.get("predsim") is PredSim and not PredSim.worker_predictions
    run = to_run_config(compose_config("strategy=predsim"))
    assert run.strategy.name == "predsim" and run.strategy.beta == 0.99 and run.strategy.projection
    assert to_run_config(compose_config("strategy=predsim", "strategy.beta=1")).strategy.beta == 1
    with pytest.raises(Exception, match="strategy.beta"):
        to_run_config(compose_config("strategy=predsim", "strategy.beta=1.5"))


def test_the_loss_is_its_definition_on_every_replica():
    """Per replica r and hidden layer l: sim_l = mean over the B x B pairs of (S(h_l P_l^T) - S(onehot(y)))^2,
    S(onehot) is 1 for a same-class pair and -1/(C-1) otherwise; the step's loss is
    (1 - beta) CE_out + sum_l [(1 - beta) CE(H_l(h_l)) + beta sim_l]."""
    R, beta = 2, 0.7
    model = tiny_mlp(R)
    x, y = tiny_batch()
    strategy = build_strategy({"name": "predsim", "beta": beta}, model)
    result = strategy.compute(x, y)
    projections = model.aux["similarity_projections"].projections
    heads = model.aux["local_heads"].heads
    (W1, b1), (W2, b2), (W3, b3) = [(layer.weight, layer.bias) for layer in [*model.hidden, model.output]]
    same = (y[:, None] == y[None, :]).double()
    label_sim = same - (1 - same) / 3  # C = 4
    for r in range(R):
        h1 = torch.relu(x @ rows(W1, r, R).T + rows(b1, r, R))
        h2 = torch.relu(h1 @ rows(W2, r, R).T + rows(b2, r, R))
        logits = h2 @ rows(W3, r, R).T + rows(b3, r, R)
        sims = [((cosine_by_hand(h @ rows(P.weight, r, R).T) - label_sim) ** 2).mean() for h, P in zip((h1, h2), projections)]
        preds = [F.cross_entropy(h @ rows(H.weight, r, R).T + rows(H.bias, r, R), y) for h, H in zip((h1, h2), heads)]
        expected = (1 - beta) * F.cross_entropy(logits, y) + sum((1 - beta) * p + beta * s for p, s in zip(preds, sims))
        torch.testing.assert_close(result.loss[r], expected)
        torch.testing.assert_close(similarity_losses(model, result.record, y, model.aux["similarity_projections"])[0][r], sims[0])
    # Replica r's projections are the one-replica network's with seed r.
    for r in range(R):
        single = WorkerNetwork(12, 4, model.cfg, [r], predictions=False).double()
        build_strategy("predsim", single)
        for P, Q in zip(projections, single.aux["similarity_projections"].projections):
            assert torch.equal(rows(P.weight, r, R), Q.weight)


def conv_model(R: int = 2) -> WorkerNetwork:
    """8x8 images: plain conv (4) -> worker conv (6, 2 workers, max-pool 2) -> FC 10 -> output, no norms."""
    cfg = ModelConfig(conv=[ConvLayerConfig(channels=4, plain=True), ConvLayerConfig(channels=6, pool=2)], hidden=[10],
                      worker_size=3, activation="relu")
    return WorkerNetwork(64, 10, cfg, list(range(R)), predictions=False).double()


@pytest.mark.parametrize("std", [True, False])
def test_conv_similarity_reads_the_projected_maps_channel_std(std):
    """A conv block: the map before its max-pool, through the replica's own 3x3 C -> C projection,
    each channel's std over the map (or the flattened map), then S; per replica."""
    R = 2
    model = conv_model(R)
    x, y = batch()
    strategy = build_strategy({"name": "predsim", "similarity_std": std}, model)
    result = strategy.compute(x, y)
    proj = model.aux["similarity_projections"]
    sims = similarity_losses(model, result.record, y, proj, std)
    conv1, conv2 = model.stems[0].layers[0], model.hidden[0]
    same = (y[:, None] == y[None, :]).double()
    label_sim = same - (1 - same) / 9
    with torch.no_grad():
        for r in range(R):
            img = x.view(-1, 1, 8, 8)
            a1 = torch.relu(F.conv2d(img, rows(conv1.weight, r, R), rows(conv1.bias, r, R), padding=1))
            h = torch.relu(F.conv2d(a1, rows(conv2.weight, r, R), rows(conv2.bias, r, R), padding=1))  # (B, 6, 8, 8)
            p = F.conv2d(h, rows(proj.projections[0].weight, r, R), padding=1)
            feats = p.flatten(2).std(2) if std else p.flatten(1)
            torch.testing.assert_close(sims[0][r], ((cosine_by_hand(feats) - label_sim) ** 2).mean())


def test_beta_zero_is_lg_bp_and_beta_one_builds_no_heads():
    x, y = batch()
    model = mixed_model()
    pred = step_grads({"name": "predsim", "beta": 0.0}, model, x, y)
    assert "similarity_projections" not in model.aux
    lg = step_grads("lg_bp", model, x, y)
    assert pred.keys() == lg.keys() and all(torch.equal(pred[k], lg[k]) for k in lg)
    sim_only = mixed_model()
    step_grads({"name": "predsim", "beta": 1.0}, sim_only, x, y)
    assert "local_heads" not in sim_only.aux and "similarity_projections" in sim_only.aux


def test_no_gradient_crosses_a_block_boundary():
    """On a model with plain conv and FC layers, batch and group norms: each block's loss (its head's
    cross-entropy and its similarity term) reaches all of its own block — plain layers, worker layer,
    norm, head, projection — and nothing else; the output loss only the output block."""
    model = mixed_model()
    x, y = batch()
    strategy = build_strategy("predsim", model)
    result = strategy.compute(x, y)
    heads, projections = model.aux["local_heads"], model.aux["similarity_projections"]
    preds = head_losses(model, heads, head_inputs(model, result.record), y)
    sims = similarity_losses(model, result.record, y, projections)
    losses = [(0.01 * p.mean(1) + 0.99 * s).sum() for p, s in zip(preds, sims)] + [model.head.global_loss(result.logits, y).sum()]
    units = [[*block, head, proj] for block, head, proj in zip(blocks(model), heads.heads, projections.projections)] + [blocks(model)[-1]]
    assert_isolated(model, losses, units)


def test_what_lies_above_a_block_leaves_its_gradient_unchanged():
    """Change everything above block 0 (block 1, its head and projection, the output layer): block 0's
    gradients are bit-identical; block 1's change (the comparison is not vacuous)."""
    x, y = batch()
    first = mixed_model()
    build_strategy("predsim", first)
    second = copy.deepcopy(first)
    with torch.no_grad():
        for module in [*blocks(second)[1], *blocks(second)[2], second.aux["local_heads"].heads[1],
                       second.aux["similarity_projections"].projections[1]]:
            for p in module.parameters():
                p.mul_(-1.5)
    a, b = step_grads("predsim", first, x, y), step_grads("predsim", second, x, y)
    own = [n for n, _ in first.named_parameters() if n.startswith(("stems.0.", "hidden.0.", "norms.0.", "aux.local_heads.heads.0.",
                                                                     "aux.similarity_projections.projections.0."))]
    assert len(own) >= 6 and all(torch.equal(a[n], b[n]) for n in own)
    assert not torch.allclose(a["hidden.1.weight"], b["hidden.1.weight"])


@pytest.mark.parametrize("extra", [[], [FILTER_CONV], pytest.param(MIXED, marks=pytest.mark.slow),
                                   ["+vary.strategy.beta=[0,0.9,1]"]], ids=["mlp", "conv", "mixed", "vary-beta"])
def test_replica_r_equals_the_single_run_with_seed_plus_r(mnist, extra):
    data = _data(mnist, torch.float64)
    population, _ = _trained("predsim", extra, data, seed=4, replicas=3, dtype=torch.float64, steps=4)
    betas = [0, 0.9, 1] if extra and "vary" in extra[0] else [0.99] * 3
    singles = [_trained("predsim", [e for e in extra if "vary" not in e] + [f"strategy.beta={betas[r]}"], data, seed=4 + r,
                        replicas=1, dtype=torch.float64, steps=4)[0] for r in range(3)]
    start = [build_model(population.cfg, 784, 10, 4 + r, predictions=False).double() for r in range(3)]
    net = [n for n, _ in population.named_parameters() if not n.startswith("aux.")]
    assert _max_relative_error(_network_only(population, net), start) > 1e-3
    tolerance = 1e-7 if any("norm" in e for e in extra) else 1e-10
    if "vary" in (extra[0] if extra else ""):
        # A single run with beta = 0 has no projections, with beta = 1 no heads: compare what each has.
        for r, single in enumerate(singles):
            mine = dict(population.named_parameters())
            for name, q in single.named_parameters():
                p = rows(mine[name], r, 3)
                assert (p - q).abs().max() / q.abs().max() < tolerance, name
    else:
        assert _max_relative_error(population, singles) < tolerance


def _network_only(model, names):
    """The model's own parameters (no aux modules), as an object ``_max_relative_error`` can read."""
    class View:
        def named_parameters(self):
            params = dict(model.named_parameters())
            return [(n, params[n]) for n in names]

    return View()


def test_learns_real_mnist_and_resumes_exactly(mnist, quick_overrides, tmp_path):
    """784-100-100-10, 2 epochs of 3000 examples (188 steps of 32), 2 seeds: measured 14 % test error
    (BP 12 %, lg_bp = beta 0 14 %, sim alone 15 %; chance 90 %). Cut after the first epoch and resumed, it is the same
    run (heads and projections are in the checkpoint)."""
    base = [*quick_overrides, "strategy=predsim", "model.hidden=[100,100]", "data.subset=3000", "trainer.batch_size=32",
            "trainer.loggers=[]", "replicas=2"]
    whole = train(compose_config(*base, f"output_dir={tmp_path / 'whole'}"), data=mnist)
    losses = [h["train_loss"] for h in whole["history"]]
    assert losses[-1] < losses[0] and whole["test_error"] < 25, (losses, whole["test_error"])
    train(compose_config(*base, "trainer.epochs=1", f"output_dir={tmp_path / 'cut'}"), data=mnist)
    resumed = train(compose_config(*base, f"output_dir={tmp_path / 'cut'}", "resume=true"), data=mnist)
    assert resumed["resumed"]
    for mine, theirs in zip(resumed["replicas"], whole["replicas"]):
        assert mine["test_acc"] == theirs["test_acc"] and mine["history"][-1]["train_loss"] == theirs["history"][-1]["train_loss"]


def test_the_similarity_loss_alone_shapes_the_hidden_layers(mnist):
    """beta = 1 (sim alone), 90 steps of 32 on 3000 MNIST images: every block's similarity-matching
    loss on 500 test images falls to under half its start (measured 0.31 -> 0.06, 0.53 -> 0.07),
    and the network predicts well above chance (the output layer reads what the sim loss built)."""
    from agentnet.data import ImageData, Split
    from agentnet.network import eval_mode
    from agentnet.session import build_session

    data = ImageData(train=Split(mnist.train.x[:3000], mnist.train.y[:3000]), test=Split(mnist.test.x[:500], mnist.test.y[:500]),
                     num_classes=10, channels=1)
    run = to_run_config(compose_config("strategy=predsim", "strategy.beta=1", "model.hidden=[100,100]", "trainer.batch_size=32",
                                       "trainer.max_steps=90", "trainer.lr_schedule=none", "trainer.progress=false",
                                       "trainer.checkpoint=false", "trainer.loggers=[]", "device=cpu"))
    session = build_session(run, data)
    model = session.model

    def sims() -> list[float]:
        with torch.no_grad(), eval_mode(model):
            record = model.forward_record(data.test.x, data.test.y, path="local")
            return [s.item() for s in similarity_losses(model, record, data.test.y, model.aux["similarity_projections"])]

    before = sims()
    session.run_all()
    after = sims()
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    with torch.no_grad(), eval_mode(model):
        accuracy = (model(data.test.x).argmax(-1)[0] == data.test.y).double().mean().item()
    assert accuracy > 0.5, accuracy  # measured 67 % (chance 10 %)


@pytest.mark.parametrize("method", CL_METHODS)
def test_every_cl_method_composes(mnist, tmp_path, method):
    check_cl_method_composes("predsim", method, mnist, tmp_path)
