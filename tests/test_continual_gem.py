"""A-GEM, GEM and LwF: the defining property of each (projection constraints, distillation), that the
reference step leaves the training step alone, exact resume, and composition with the learning rules."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agentnet.config import ModelConfig
from agentnet.continual.methods import build_cl_method
from agentnet.continual.methods._episodic import parameter_groups
from agentnet.continual.methods.agem import AGEM
from agentnet.continual.methods.gem import GEM
from agentnet.continual.methods.lwf import LwF
from agentnet.recipes import run_continual
from agentnet.continual.streams import TaskStream
from agentnet.network import WorkerNetwork
from agentnet.composition import to_run_config
from agentnet.registry import build_strategy
from tests.conftest import compose_config, without_timing


def _setup(mnist, strategy="bp", tasks=2, **model):
    """A two-replica population on a tiny permuted stream, its strategy, and a stand-in trainer."""
    torch.manual_seed(0)
    data = mnist.__class__(train=mnist.train.subset(400), test=mnist.test.subset(100))
    stream = TaskStream(data, "permuted", tasks, seeds=[0, 1])
    net = WorkerNetwork(784, 10, ModelConfig(hidden=[20], worker_size=10, **model), seeds=[0, 1])
    rule = build_strategy({"name": strategy}, net)
    return net, rule, stream, SimpleNamespace(model=net, strategy=rule)


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = None if g is None else g.clone()


def _strategy_grads(model, strategy, x, y):
    """The strategy's gradient on (x, y), computed here independently of the method."""
    for p in model.parameters():
        p.grad = None
    strategy.backward(strategy.compute(x, y))
    out = _grads(model)
    for p in model.parameters():
        p.grad = None
    return out


def _per_replica(grads, params_of_group, model, R=2):
    """Flat ``(R, P)`` of the entries of ``grads`` (listed like model.parameters()) for a group."""
    ids = [id(p) for p in model.parameters()]
    rows = []
    for p in params_of_group:
        g = grads[ids.index(id(p))]
        rows.append((torch.zeros_like(p) if g is None else g).reshape(R, -1))
    return torch.cat(rows, 1)


def _training_step(model, strategy, stream, task):
    x, y = stream.batch(stream.tasks[task], torch.arange(32))
    for p in model.parameters():
        p.grad = None
    result = strategy.compute(x, y)
    strategy.backward(result)
    return result


@pytest.mark.parametrize("strategy", ["bp", "lfnn_local", "fg_a"])
@pytest.mark.parametrize("projection", ["global", "layer"])
def test_agem_projects_conflicts_per_replica_and_keeps_the_rest(strategy, projection, mnist):
    model, rule, stream, trainer = _setup(mnist, strategy)
    method = build_cl_method({"name": "agem", "memory_per_task": 50, "memory_batch": 1000, "projection": projection}, model)
    method.after_task(trainer, stream, stream.tasks[0])
    assert method.memory.x[0].shape == (2, 50, 784)
    result = _training_step(model, rule, stream, 1)
    # g_ref, independently: the strategy's gradient on the whole memory (memory_batch >= its size).
    # The method restores the strategy's state, so a forward-gradient rule draws the same directions.
    state = copy.deepcopy(rule.state_dict())
    g = _grads(model)
    ref = _strategy_grads(model, rule, method.memory.x[0], method.memory.y[0])
    rule.load_state_dict(state)
    groups = parameter_groups(model, projection)
    assert len(groups) == (1 if projection == "global" else 2)  # hidden layer and output layer
    # Force one replica into conflict (-g_ref plus noise) and the other out of it (+g_ref plus a bit).
    torch.manual_seed(1)
    forced = []
    for gp, rp in zip(g, ref):
        if gp is None:
            forced.append(None)
            continue
        half = gp.shape[0] // 2
        f = gp.clone()
        f[:half] = -rp[:half] + 0.1 * rp[:half].std() * torch.randn_like(rp[:half])
        f[half:] = rp[half:] + 0.01 * gp[half:]
        forced.append(f)
    for start in (g, forced):
        _set_grads(model, start)
        method.after_backward(trainer, result)
        new = _grads(model)
        for group in groups:
            g0, gn, r = (_per_replica(v, group, model) for v in (start, new, ref))
            before, after = (g0 * r).sum(1), (gn * r).sum(1)
            scale = gn.norm(dim=1) * r.norm(dim=1)
            assert (after >= -1e-5 * scale).all(), (before, after)  # no conflict left, in any replica
            for k in range(2):
                if before[k] >= 0:
                    assert torch.equal(gn[k], g0[k])  # no conflict: g untouched, bit for bit
                else:
                    expected = g0[k] - before[k] / (r[k] @ r[k]) * r[k]
                    assert (gn[k] - expected).abs().max() <= 1e-5 * g0[k].abs().max(), (gn[k] - expected).abs().max()
                    assert after[k].abs() <= 1e-4 * scale[k]  # onto the constraint's boundary
    assert method.projections[0] >= len(groups)  # the forced conflict, in every group


def test_reference_step_leaves_the_training_step_alone(mnist):
    """Leader counts, batch-norm statistics, torch's RNG and the replicas' own gradients are as the
    strategy left them; only the projected gradient changes."""
    model, rule, stream, trainer = _setup(mnist, "lfnn", hidden_norm="batch", hidden_dropout=0.2)
    method = build_cl_method({"name": "agem", "memory_per_task": 40}, model)
    method.after_task(trainer, stream, stream.tasks[0])
    result = _training_step(model, rule, stream, 1)
    selection = copy.deepcopy(rule.state_dict())
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    method.after_backward(trainer, result)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    after = rule.state_dict()["selection"]
    assert all(torch.equal(a, b) for a, b in zip(selection["selection"]["counts"], after["counts"]))
    assert model.head.logit_mask is None


@pytest.mark.parametrize("strategy", ["bp", "fa"])
@pytest.mark.parametrize("projection", ["global", "layer"])
def test_gem_satisfies_every_constraint(strategy, projection, mnist):
    model, rule, stream, trainer = _setup(mnist, strategy, tasks=3)
    method = build_cl_method({"name": "gem", "memory_per_task": 40, "projection": projection}, model)
    for t in (0, 1):
        method.after_task(trainer, stream, stream.tasks[t])
    result = _training_step(model, rule, stream, 2)
    g = _grads(model)
    refs = [_strategy_grads(model, rule, *method.memory.task_batch(t)[:2]) for t in (0, 1)]
    # Also a start that violates both constraints in replica 0.
    forced = [None if gp is None else torch.cat([-(a + b)[: gp.shape[0] // 2], gp[gp.shape[0] // 2 :]])
              for gp, a, b in zip(g, *refs)]
    for start in (g, forced):
        _set_grads(model, start)
        method.after_backward(trainer, result)
        new = _grads(model)
        for index, group in enumerate(parameter_groups(model, projection)):
            g0, gn = _per_replica(start, group, model), _per_replica(new, group, model)
            G = torch.stack([_per_replica(r, group, model) for r in refs], 1)  # (R, K, P)
            before, after = torch.einsum("rkp,rp->rk", G, g0), torch.einsum("rkp,rp->rk", G, gn)
            tol = 1e-2 * (G * G).sum(2).mean(1, keepdim=True)  # qp_eps is relative to mean |g_k|^2
            assert (after >= -tol).all(), (before, after)
            for k in range(2):
                if (before[k] >= 0).all():
                    assert torch.equal(gn[k], g0[k])
            assert torch.allclose(after, method.last["after"][index], rtol=1e-4, atol=1e-6)
    assert (method.projections[0] > 0).item()


def test_gem_without_margin_is_the_closest_feasible_update(mnist):
    """memory_strength=0: g~ solves min |g~ - g|^2 s.t. G g~ >= 0 (checked against its KKT conditions)."""
    model, rule, stream, trainer = _setup(mnist, "bp", tasks=3)
    method = build_cl_method({"name": "gem", "memory_per_task": 40, "memory_strength": 0.0, "qp_eps": 1e-9}, model)
    for t in (0, 1):
        method.after_task(trainer, stream, stream.tasks[t])
    result = _training_step(model, rule, stream, 2)
    refs = [_strategy_grads(model, rule, *method.memory.task_batch(t)[:2]) for t in (0, 1)]
    _set_grads(model, [None if a is None else -a + 0.3 * b for a, b in zip(*refs)])
    start = _grads(model)
    method.after_backward(trainer, result)
    group = parameter_groups(model, "global")[0]
    g0, gn = _per_replica(start, group, model), _per_replica(_grads(model), group, model)
    G = torch.stack([_per_replica(r, group, model) for r in refs], 1)
    v = torch.linalg.lstsq(G.transpose(1, 2).double(), (gn - g0).double().unsqueeze(-1)).solution.squeeze(-1)  # g~ - g = G^T v
    assert torch.allclose((G.transpose(1, 2).double() @ v.unsqueeze(-1)).squeeze(-1), (gn - g0).double(), atol=1e-5)
    assert (v >= -1e-6).all()  # dual feasible
    slack = torch.einsum("rkp,rp->rk", G.double(), gn.double())
    assert (slack >= -1e-6 * (G * G).sum(2).double()).all()  # primal feasible
    assert ((v * slack).abs() <= 1e-4 * (G * G).sum(2).double()).all()  # complementary slackness


@pytest.mark.parametrize("local", [False, True])
def test_lwf_distillation_zero_before_first_task_end_positive_after(local, mnist):
    model, rule, stream, trainer = _setup(mnist, "lfnn_local" if local else "bp")
    method = build_cl_method({"name": "lwf", "lwf_local": local, "lwf_alpha": 2.0}, model)
    x, y = stream.batch(stream.tasks[1], torch.arange(64))
    assert torch.equal(method.distillation(x), torch.zeros(2))
    result = _training_step(model, rule, stream, 1)
    g = _grads(model)
    method.before_step(trainer, x, y)
    method.after_backward(trainer, result)
    assert all(torch.equal(a, b) for a, b in zip(g, _grads(model)))  # nothing added before a task ended
    method.after_task(trainer, stream, stream.tasks[0])
    assert torch.allclose(method.distillation(x), torch.zeros(2), atol=1e-6)  # the copy is the model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        xb, yb = stream.batch(stream.tasks[1], torch.arange(64 * i, 64 * (i + 1)))
        opt.zero_grad()
        model.head.global_loss(model(xb), yb).sum().backward()
        opt.step()
    term = method.distillation(x)
    assert term.shape == (2,) and (term > 0).all()
    # A population varying lwf_alpha: each replica's term carries its own weight.
    varied = build_cl_method({"name": "lwf", "lwf_local": local}, model, {"lwf_alpha": [0.5, 3.0]})
    varied.old, varied.heads = method.old, method.heads
    assert torch.allclose(varied.distillation(x), term / 2.0 * torch.tensor([0.5, 3.0]), rtol=1e-5)
    # after_backward adds exactly the term's gradient to what the strategy wrote.
    result = _training_step(model, rule, stream, 1)
    g = _grads(model)
    expected = torch.autograd.grad(method.distillation(x).sum(), list(model.parameters()), allow_unused=True)
    method.before_step(trainer, x, y)
    method.after_backward(trainer, result)
    for before, add, after in zip(g, expected, _grads(model)):
        if add is None:
            assert (before is None and after is None) or torch.equal(before, after)
        else:
            assert torch.allclose(after, (0 if before is None else before) + add, atol=1e-6)
    assert method.penalty() > 0
    if local:  # no gradient crosses a layer: the hidden layer's share is its workers' own distillation
        assert expected[0] is not None and torch.isfinite(expected[0]).all()


@pytest.mark.parametrize("method", ["agem", "gem", "lwf"])
def test_checkpointed_run_resumes_exactly(method, mnist, tmp_path, monkeypatch):
    """Two tasks, stopped inside the second one after a checkpoint, resumed: identical metrics."""
    overrides = ["strategy=lfnn", "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=20",
                 f"cl={method}", "data.subset=1500", "data.test_subset=300", "trainer.progress=false", "device=cpu",
                 "trainer.checkpoint_every=5", "trainer.loggers=[]", "model.hidden=[100]"]
    if method != "lwf":
        overrides.append("cl.memory_per_task=60")
    if method == "agem":
        overrides.append("cl.memory_batch=32")  # a strict subset: the sampling generator must resume too
    straight = run_continual(compose_config(*overrides, f"output_dir={tmp_path / 'a'}"), data=mnist)
    cls = {"agem": AGEM, "gem": GEM, "lwf": LwF}[method]
    original = cls.after_step

    class Stop(Exception):
        pass

    def stop(self, trainer, x, y, result):
        original(self, trainer, x, y, result)
        if trainer.step == 33:  # inside task 2, a few steps after its last checkpoint
            raise Stop

    monkeypatch.setattr(cls, "after_step", stop)
    with pytest.raises(Stop):
        run_continual(compose_config(*overrides, f"output_dir={tmp_path / 'b'}"), data=mnist)
    monkeypatch.undo()
    resumed = run_continual(compose_config(*overrides, "resume=true", f"output_dir={tmp_path / 'b'}"), data=mnist)
    assert 20 < resumed["resumed"]["step"] < 33
    assert without_timing(straight) == without_timing(resumed)


_COMPOSE = [
    ("bp", "agem", []), ("bp", "gem", ["cl.projection=layer"]), ("bp", "lwf", []),
    ("lfnn_local", "agem", ["cl.projection=layer"]), ("lfnn_local", "gem", []), ("lfnn_local", "lwf", ["cl.lwf_local=true"]),
    ("fa", "agem", []), ("fa", "gem", []), ("fa", "lwf", []),
    ("fg_a", "agem", ["cl.projection=layer"]), ("fg_a", "gem", ["cl.projection=layer"]), ("fg_a", "lwf", ["cl.lwf_local=true"]),
    ("pepita", "agem", []), ("pepita", "gem", ["cl.projection=layer"]), ("pepita", "lwf", []), ("pepita", "lwf", ["cl.lwf_local=true"]),
]
#: Every rule and every method at least once in the default suite; the rest with -m slow.
_QUICK = {("bp", "agem"), ("bp", "lwf"), ("lfnn_local", "gem"), ("lfnn_local", "lwf"), ("fa", "agem"), ("fg_a", "gem"),
          ("pepita", "agem")}


@pytest.mark.parametrize("strategy,method,extra", [
    pytest.param(s, m, e, marks=() if (s, m) in _QUICK else pytest.mark.slow) for s, m, e in _COMPOSE
])
def test_new_methods_compose_with_learning_rules(strategy, method, extra, mnist, tmp_path):
    overrides = [
        "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=25", "data.subset=1500",
        "data.test_subset=300", "trainer.progress=false", "device=cpu", f"output_dir={tmp_path}", "model.hidden=[100]",
        *(["cl.memory_per_task=64", "cl.memory_batch=64"] if method == "agem" else []),
        *(["cl.memory_per_task=64"] if method == "gem" else []), *extra,
    ]
    metrics = run_continual(compose_config(f"strategy={strategy}", f"cl={method}", *overrides), data=mnist)
    R = np.array(metrics["acc_matrix"])
    assert R.shape == (3, 2) and np.isfinite(R).all()
    assert R[1, 0] > 0.12  # above chance after the first task


def test_new_method_configs_validate_with_field_names():
    base = ("benchmark=pmnist_quick",)
    run = to_run_config(compose_config(*base, "cl=gem"))
    assert run.cl.memory_per_task == 256 and run.cl.memory_strength == 0.5 and run.cl.projection == "global"
    assert to_run_config(compose_config(*base, "cl=agem")).cl.memory_batch == 256
    assert to_run_config(compose_config(*base, "cl=lwf")).cl.temperature == 2.0
    for method, field, value in [("agem", "projection", "diagonal"), ("agem", "memory_batch", 0), ("gem", "memory_per_task", 0),
                                 ("gem", "memory_strength", -1), ("gem", "qp_eps", 0), ("lwf", "temperature", 0),
                                 ("lwf", "lwf_alpha", -1)]:
        with pytest.raises(Exception, match=f"cl.{field}"):
            to_run_config(compose_config(*base, f"cl={method}", f"cl.{field}={value}"))
