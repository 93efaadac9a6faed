"""The paper's experiments: every config composes and validates; each runs in a fast variant (slow).
The sweep presets among the experiment configs (Table 3, Table 1 CIFAR-10) are tested in test_resnet18.py."""

from __future__ import annotations

import json

import pytest
import torch

from agentnet.experiments import EXPERIMENTS, run_experiment
from agentnet.composition import to_run_config
from agentnet.config import RunConfig, TrainerConfig
from agentnet.experiments.one_vs_all import Setting, one_vs_all_model, train_one_vs_all
from agentnet.network import build_model
from agentnet.registry import STRATEGIES
from strategies.leaders import LeaderHook, LeaderSelection
from tests.conftest import compose_config, experiment_presets

NAMES = experiment_presets()[0]


def test_experiment_configs_registered_and_valid():
    assert set(NAMES) == set(EXPERIMENTS.names())
    for name in NAMES:
        run = to_run_config(compose_config(f"experiment={name}"))
        assert run.experiment.name == name
    with pytest.raises(Exception, match="experiment.leadership"):
        to_run_config(compose_config("experiment=lfnn_online_pmnist", "experiment.leadership=[0.0]"))


def test_online_population_learns_and_bp_replicas_are_plain_bp(mnist):
    """Fig. 3's one-vs-all classifiers as one population through the engine, on real MNIST."""
    x, y = mnist.train.x[:3000], mnist.train.y[:3000]
    settings = [Setting("30%", delta=0.3), Setting("BP", bp=True), Setting("global only", delta=0.3, lambda1=0, lambda2=0)]
    base = RunConfig(strategy=STRATEGIES.config("lfnn"), trainer=TrainerConfig(progress=False))
    result = train_one_vs_all(base, x, y, mnist.test.x[:1000], mnist.test.y[:1000], settings, width=16, record_activity=True)
    assert all(a > 0.6 for a in result.test_acc), result.test_acc  # one pass over 3000 images, 10 one-vs-all nets
    assert result.activity.shape == (300, 16) and result.activity_leaders.sum(1).eq(5).all()  # ceil(0.3*16) leaders
    assert len(result.curves) == 3 and len(result.curves[0]) == len(result.curve_steps) and result.curve_steps[-1] == 300
    assert Setting("BP", bp=True).strategy_values() == {"delta": 1.0, "lambda1": 0.0, "lambda2": 0.0}


def test_online_workers_predict_from_the_logit_and_align_their_sigmoid_output(mnist):
    """The paper's online nets: BCE on a worker's logit z, followers' MSE on its output f(z)."""
    model = build_model(one_vs_all_model(8), mnist.input_dim, 2, [0, 1])
    x, y = mnist.train.x[:20], (mnist.train.y[:20] == 3).long()
    hook = LeaderHook(LeaderSelection(0.25, "batch", [8], replicas=2))
    record = model.forward_record(x, y, path="split", hook=hook).layers[0]
    torch.testing.assert_close(record.aligned, torch.sigmoid(record.workers))
    assert record.workers.shape == (2, 20, 8, 1) and record.leaders.sum(1).eq(2).all()


def test_online_experiment_config_refuses_a_removed_field():
    with pytest.raises(Exception, match="experiment.no_such_field"):
        to_run_config(compose_config("experiment=lfnn_online_pmnist", "experiment.no_such_field=1"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_experiment_fast_variant_runs(name, mnist, tmp_path):
    extra = ["experiment.widths=[16,32]"] if name == "lfnn_online_pmnist" else []
    run = to_run_config(compose_config(f"experiment={name}", "trainer.max_steps=20", "data.subset=2000",
                                       "data.test_subset=500", "trainer.progress=false", *extra))
    result = run_experiment(run, tmp_path, data=mnist)
    assert result["summary"] and all(isinstance(v, float) for v in result["summary"].values())
    assert json.loads((tmp_path / "experiment.json").read_text())["experiment"] == name
    assert list(tmp_path.glob("*.png")) and list(tmp_path.glob("*.md"))


def test_table1_counts_every_replica_as_a_seed_and_lists_the_other_rules(mnist, tmp_path):
    """``replicas=2`` with one seed gives two networks per cell: mean ± sample std over both, beside the paper."""
    run = to_run_config(compose_config("experiment=lfnn_table1_mnist", "experiment.models=[mlp_275k]", "experiment.strategies=[bp,fa]",
                                       "experiment.seeds=[0]", "replicas=2", "trainer.max_steps=5", "data.subset=640",
                                       "data.test_subset=500", "trainer.progress=false", "trainer.checkpoint=false"))
    result = run_experiment(run, tmp_path, data=mnist)
    table = (tmp_path / "table1.md").read_text()
    fa_row = next(line for line in table.splitlines() if "| fa |" in line)
    cells = [c.strip() for c in fa_row.strip("|").split("|")]
    assert cells[-1] == "2" and cells[-2] == "2.82 / 0.00", fa_row  # two networks; the paper's FA figure
    mean, std = (float(v) for v in cells[3].split(" ± "))
    assert std > 0 and mean == pytest.approx(result["summary"]["test_error_mlp_275k_fa"])


def test_leadership_sweep_reports_mean_and_std_over_every_network(mnist, tmp_path):
    """Table 2 on its default model (the ~275K CNN): each cell is mean ± std over seeds x replicas."""
    run = to_run_config(compose_config("experiment=lfnn_leadership_sweep", "experiment.strategies=[lfnn_local]",
                                       "experiment.leadership=[0.5,1.0]", "experiment.seeds=[0]", "replicas=2",
                                       "trainer.max_steps=3", "data.subset=256", "data.test_subset=200",
                                       "trainer.progress=false", "trainer.checkpoint=false"))
    assert run.experiment.models == ["cnn_mnist_275k"]
    result = run_experiment(run, tmp_path, data=mnist)
    row = next(line for line in (tmp_path / "leadership_sweep.md").read_text().splitlines() if "lfnn_local (agentnet)" in line)
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert len(cells) == 2
    for cell, delta in zip(cells, ("0.5", "1")):
        mean, std = (float(v) for v in cell.split(" ± "))
        assert std > 0 and mean == pytest.approx(result["summary"][f"test_error_lfnn_local_d{delta}"], abs=0.006)
    assert (tmp_path / "leadership_sweep.png").is_file()
