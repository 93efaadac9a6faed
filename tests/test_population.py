"""Populations: replica ``r`` of a ``replicas=R`` run is exactly the single run with ``seed + r``
(or with its own variant value), for every strategy, FC and conv, single and continual runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agentnet.config import ConfigError
from agentnet.recipes import run_continual, train
from agentnet.data import ImageData, Split
from agentnet.network import build_model
from agentnet.population import population_of, summarize
from agentnet.composition import to_run_config
from agentnet.session import build_session
from agentnet.training.checkpoint import load_checkpoint
from tests.conftest import compose_config, data_root

SMALL_CONV = "model.conv=[{channels:20,pool:2},{channels:20,block:vgg,workers:2,depth:2,pool:2}]"
FILTER_CONV = "model.conv=[{channels:20,pool:2}]"
#: Plain layers, batch and group norms, standardised worker predictions.
MIXED = ["model.conv=[{channels:10,plain:true,norm:batch},{channels:20,pool:2,norm:group}]", "model.hidden_plain=[0]",
         "model.hidden_norm=batch", "model.worker_norm=standardize", "model.worker_logit_scale=3"]

CASES = [
    ("bp", []),
    ("lfnn", []),
    ("lfnn_local", []),
    ("lfnn", ["strategy.selection=sample"]),
    ("lfnn", ["strategy.selection=epoch"]),
    ("lfnn_local", ["model.worker_head=true"]),
    ("attention", ["strategy.mode=exact"]),
    ("attention", ["strategy.mode=normalized"]),
    ("attention", ["strategy.mode=topk"]),
    ("bp", [SMALL_CONV]),
    ("lfnn", [SMALL_CONV]),
    ("lfnn_local", [SMALL_CONV]),
    ("lfnn", MIXED),
    ("lfnn_local", MIXED),
    ("fa", []),
    ("fa", [FILTER_CONV]),
    ("lg_bp", MIXED),
    ("fg_w", []),
    ("lg_fg_w", []),
    # Activity perturbation is MLP-only here: on MNIST's blank borders a max-pool window holds equal
    # maps, and which one carries the tangent is the pooling kernel's tie-break, which differs
    # between the folded population and a single network (both estimates are valid; not bit-equal).
    ("fg_a", []),
    ("lg_fg_a", ["model.hidden_norm=batch"]),
    ("pepita", []),
    ("pepita", [FILTER_CONV]),
    ("ff", ["strategy.negatives=hard", "strategy.prediction=linear"]),
    # on-device crops and flips: each replica's from its own seed, as its single run's
    ("lfnn", [FILTER_CONV, "data.augment=crop_flip"]),
]


def _data(mnist: ImageData, dtype: torch.dtype) -> ImageData:
    train = Split(mnist.train.x[:320].to(dtype), mnist.train.y[:320])
    test = Split(mnist.test.x[:200].to(dtype), mnist.test.y[:200])
    return ImageData(train=train, test=test, num_classes=10, channels=1)


def _trained(strategy: str, extra: list[str], data: ImageData, seed: int, replicas: int, dtype: torch.dtype, steps: int = 6):
    run = to_run_config(compose_config(
        f"strategy={strategy}", "model=mlp_400x2", "model.hidden=[40,40]", "trainer.batch_size=32", f"trainer.max_steps={steps}",
        "trainer.fused=false", "trainer.progress=false", "trainer.checkpoint=false", "device=cpu",
        f"seed={seed}", f"replicas={replicas}", *extra,
    ))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        session = build_session(run, data)
    finally:
        torch.set_default_dtype(previous)
    session.run_all()
    return session.model, session.trainer


def _max_relative_error(population, singles: list) -> float:
    R = len(singles)
    worst = 0.0
    for r, single in enumerate(singles):
        for (name, p), q in zip(population.named_parameters(), single.parameters()):
            rows = p.shape[0] // R
            assert p[r * rows : (r + 1) * rows].shape == q.shape, name
            worst = max(worst, ((p[r * rows : (r + 1) * rows] - q).abs().max() / q.abs().max()).item())
    return worst


@pytest.mark.parametrize("strategy,extra", CASES, ids=[f"{s}{'-' + '-'.join(e) if e else ''}"[:60] for s, e in CASES])
def test_replica_r_equals_the_single_run_with_seed_plus_r_float64(mnist, strategy, extra):
    data = _data(mnist, torch.float64)
    population, _ = _trained(strategy, extra, data, seed=4, replicas=3, dtype=torch.float64)
    singles = [_trained(strategy, extra, data, seed=4 + r, replicas=1, dtype=torch.float64)[0] for r in range(3)]
    start = [build_model(population.cfg, 784, 10, 4 + r).double() for r in range(3)]
    assert _max_relative_error(population, start) > 1e-3  # the runs trained (the comparison is not vacuous)
    # Norm kernels reduce over R*C channels in another order than over C: float64 rounding, not mixing.
    assert _max_relative_error(population, singles) < (1e-7 if any("norm" in e for e in extra) else 1e-10)


@pytest.mark.parametrize("strategy", ["bp", "lfnn", "lfnn_local", "attention"])
def test_replica_equivalence_float32(mnist, strategy):
    data = _data(mnist, torch.float32)
    population, trainer = _trained(strategy, [], data, seed=0, replicas=2, dtype=torch.float32)
    singles = [_trained(strategy, [], data, seed=r, replicas=1, dtype=torch.float32) for r in range(2)]
    assert _max_relative_error(population, [m for m, _ in singles]) < 1e-5
    # Per-replica accounting matches each single run's own history.
    for r, (_, single) in enumerate(singles):
        assert trainer.histories[r][-1]["train_loss"] == pytest.approx(single.history[-1]["train_loss"], rel=1e-5)


def test_per_replica_variants_equal_single_runs_with_that_value(mnist):
    """vary.strategy.delta / lambda1 and vary.trainer.lr with one seed: replica r is the single run with value r."""
    data = _data(mnist, torch.float64)
    deltas, lambdas, lrs = [0.2, 0.6, 1.0], [0.05, 0.1, 0.5], [1e-3, 3e-3, 5e-4]
    vary = [f"+vary.strategy.delta=[{','.join(map(str, deltas))}]", f"+vary.strategy.lambda1=[{','.join(map(str, lambdas))}]",
            f"+vary.trainer.lr=[{','.join(map(str, lrs))}]", "+vary.seed=[7,7,7]"]
    population, _ = _trained("lfnn", vary, data, seed=0, replicas=3, dtype=torch.float64)
    singles = [
        _trained("lfnn", [f"strategy.delta={d}", f"strategy.lambda1={l}", f"trainer.lr={lr}"], data, seed=7, replicas=1, dtype=torch.float64)[0]
        for d, l, lr in zip(deltas, lambdas, lrs)
    ]
    assert _max_relative_error(population, singles) < 1e-10


def test_variant_errors_name_the_field():
    base = ["strategy=lfnn", "replicas=2"]
    with pytest.raises(ConfigError, match=r"vary\.strategy\.selection: not a per-replica field of strategy=lfnn"):
        population_of(to_run_config(compose_config(*base, "+vary.strategy.selection=[1,2]")))
    with pytest.raises(ConfigError, match=r"vary\.strategy\.delta=.*one value per replica \(2 values"):
        population_of(to_run_config(compose_config(*base, "+vary.strategy.delta=[0.1,0.2,0.3]")))
    with pytest.raises(ConfigError, match=r"vary\.strategy\.delta: strategy\.delta=1\.5"):
        population_of(to_run_config(compose_config(*base, "+vary.strategy.delta=[0.5,1.5]")))
    with pytest.raises(ConfigError, match=r"vary\.trainer\.batch_size: not a per-replica field"):
        population_of(to_run_config(compose_config(*base, "+vary.trainer.batch_size=[8,16]")))
    with pytest.raises(ConfigError, match="replicas=0"):
        to_run_config(compose_config("replicas=0"))


def test_population_metrics_mean_std_and_replicas(tmp_path, quick_overrides):
    metrics = train(compose_config(*quick_overrides, "strategy=lfnn_local", "replicas=3", "trainer.epochs=1", "data.subset=1000"))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["seeds"] == [0, 1, 2] and len(written["replicas"]) == 3
    accs = [r["test_acc"] for r in written["replicas"]]
    assert written["test_acc"] == pytest.approx(sum(accs) / 3)
    assert written["test_acc_std"] == pytest.approx(torch.tensor(accs, dtype=torch.float64).std().item())
    assert len(set(accs)) > 1  # independent initialisations and orders
    assert [r["seed"] for r in written["replicas"]] == [0, 1, 2]
    assert written["num_params"] == written["replicas"][0]["num_params"] == 279_870
    assert "history" in written["replicas"][0] and written["history"][0]["epoch"] == 1
    assert metrics["samples_per_s"] > 0 and (tmp_path / "history.png").is_file()


def test_summarize_means_nested_lists_and_keeps_shared_counts():
    out = summarize([{"a": 1.0, "m": [[1.0, 2.0]], "steps": 5, "name": "x"}, {"a": 3.0, "m": [[3.0, 4.0]], "steps": 5, "name": "x"}])
    assert out["a"] == 2.0 and out["a_std"] == pytest.approx(2 ** 0.5) and out["m"] == [[2.0, 3.0]]
    assert out["steps"] == 5 and "steps_std" not in out and out["name"] == "x" and len(out["replicas"]) == 2


@pytest.mark.parametrize("cl", ["ewc", "replay", "si", "agem", "gem", "lwf"])
def test_continual_replica_equals_single_run_across_a_task_boundary(tmp_path, cl):
    common = [f"data.root={data_root()}", "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=8",
              f"cl={cl}", "strategy=lfnn", "model=mlp_400x2", "model.hidden=[40,40]", "data.subset=600", "data.test_subset=200",
              "trainer.batch_size=32", "trainer.fused=false", "trainer.progress=false", "device=cpu"]
    if cl == "ewc":
        common.append("cl.fisher_samples=50")
    if cl == "replay":
        common += ["cl.buffer_size=64", "cl.replay_batch=16"]
    if cl in ("agem", "gem"):  # a memory batch smaller than the memory: the same draw in every replica
        common += ["cl.memory_per_task=32", "cl.projection=layer"] + (["cl.memory_batch=16"] if cl == "agem" else [])
    pop = run_continual(compose_config(*common, "replicas=2", "seed=3", f"output_dir={tmp_path / 'pop'}"))
    state = load_checkpoint(tmp_path / "pop" / "checkpoint.pt", "cpu")["model"]
    for r in range(2):
        single = run_continual(compose_config(*common, f"seed={3 + r}", f"output_dir={tmp_path / f's{r}'}"))
        single_state = load_checkpoint(tmp_path / f"s{r}" / "checkpoint.pt", "cpu")["model"]
        for name, q in single_state.items():
            p = state[name]
            rows = p.shape[0] // 2
            # EWC's exact Fisher equals per replica to ~1e-6, but its penalty's gradient starts at ~0
            # after the task boundary and Adam's normalisation magnifies float-level differences
            # of tiny gradients: equal to 1e-3 there (measured 3e-4), float-level elsewhere.
            tol = 1e-3 if cl == "ewc" else 1e-5
            assert (p[r * rows : (r + 1) * rows] - q).abs().max() <= tol * q.abs().max(), name
        np.testing.assert_allclose(pop["replicas"][r]["acc_matrix"], single["acc_matrix"], atol=2e-3)
        assert pop["replicas"][r]["seed"] == 3 + r
    assert pop["ACC"] == pytest.approx(sum(r["ACC"] for r in pop["replicas"]) / 2)
    assert "ACC_std" in pop and (tmp_path / "pop" / "task_accuracy.png").is_file()


def test_online_population_replica_is_the_seed_run(tmp_path):
    """``benchmark.samples_per_task``: replica r trains on, and remembers, the examples seed + r picks."""
    common = [f"data.root={data_root()}", "benchmark=pmnist_online", "benchmark.num_tasks=2", "benchmark.samples_per_task=60",
              "benchmark.epochs_per_task=2", "cl=agem", "cl.memory_per_task=24", "cl.memory_batch=16", "strategy=lfnn",
              "model.hidden=[40,40]", "data.test_subset=200", "trainer.fused=false", "trainer.progress=false",
              "trainer.loggers=[]", "device=cpu"]
    pop = run_continual(compose_config(*common, "replicas=2", "seed=3", f"output_dir={tmp_path / 'pop'}"))
    assert pop["steps"] == 2 * 2 * 6
    saved = load_checkpoint(tmp_path / "pop" / "checkpoint.pt", "cpu")
    state, memory = saved["model"], saved["plugins"]["cl.agem"]["memory"]["x"]
    for r in range(2):
        single = run_continual(compose_config(*common, f"seed={3 + r}", f"output_dir={tmp_path / f's{r}'}"))
        single_saved = load_checkpoint(tmp_path / f"s{r}" / "checkpoint.pt", "cpu")
        for name, q in single_saved["model"].items():
            p = state[name]
            rows = p.shape[0] // 2
            assert (p[r * rows : (r + 1) * rows] - q).abs().max() <= 1e-5 * q.abs().max(), name
        for mine, theirs in zip(memory, single_saved["plugins"]["cl.agem"]["memory"]["x"]):
            assert torch.equal(mine[r], theirs[0])  # the same remembered examples
        np.testing.assert_allclose(pop["replicas"][r]["acc_matrix"], single["acc_matrix"], atol=2e-3)
    assert not torch.equal(memory[0][0], memory[0][1])


def test_population_resumes_exactly(tmp_path, quick_overrides):
    base = [*quick_overrides, "strategy=lfnn", "replicas=2", "trainer.epochs=2", "data.subset=640", "trainer.batch_size=64"]
    whole = train(compose_config(*base, f"output_dir={tmp_path / 'whole'}"))
    train(compose_config(*base, "trainer.epochs=1", f"output_dir={tmp_path / 'cut'}"))  # growing epochs may resume
    resumed = train(compose_config(*base, f"output_dir={tmp_path / 'cut'}", "resume=true"))
    assert [r["test_acc"] for r in resumed["replicas"]] == [r["test_acc"] for r in whole["replicas"]]
    assert resumed["replicas"][1]["history"][-1]["train_loss"] == whole["replicas"][1]["history"][-1]["train_loss"]


def test_attention_protect_replica_equals_single_run_across_task_boundaries(tmp_path):
    """``mode=protect`` after task ends (importances, anchors, per-replica means of Omega, a varied
    ``protect_lambda``): replica r is the single run with seed 3 + r and its own value."""
    common = [f"data.root={data_root()}", "benchmark=pmnist_quick", "benchmark.num_tasks=3", "benchmark.iterations_per_task=8",
              "strategy=attention", "strategy.mode=protect", "strategy.protect_c=2", "model=mlp_400x2", "model.hidden=[40,40]",
              "data.subset=600", "data.test_subset=200", "trainer.batch_size=32", "trainer.fused=false", "trainer.progress=false",
              "device=cpu"]
    lambdas = [50.0, 500.0]
    pop = run_continual(compose_config(*common, "replicas=2", "seed=3", f"+vary.strategy.protect_lambda=[{lambdas[0]},{lambdas[1]}]",
                                       f"output_dir={tmp_path / 'pop'}"))
    state = load_checkpoint(tmp_path / "pop" / "checkpoint.pt", "cpu")
    assert state["strategy"]["protect"]["tasks"] == 3
    for r in range(2):
        single = run_continual(compose_config(*common, f"seed={3 + r}", f"strategy.protect_lambda={lambdas[r]}",
                                              f"output_dir={tmp_path / f's{r}'}"))
        single_state = load_checkpoint(tmp_path / f"s{r}" / "checkpoint.pt", "cpu")["model"]
        for name, q in single_state.items():
            p = state["model"][name]
            rows = p.shape[0] // 2
            assert (p[r * rows : (r + 1) * rows] - q).abs().max() <= 1e-5 * q.abs().max(), name
        np.testing.assert_allclose(pop["replicas"][r]["acc_matrix"], single["acc_matrix"], atol=2e-3)
    # The two strengths really differ (the comparison is not of two identical runs).
    assert pop["replicas"][0]["acc_matrix"] != pop["replicas"][1]["acc_matrix"]
