"""Property-based tests (issue 33, item 5), with bounded, derandomised example counts (fast and
reproducible in the default suite): inputs nobody wrote by hand.

- Random config overrides — any group's option (or a name that is none), any field of the composed
  config (or one that does not exist), values of every type including NaN, ±inf, huge, negative,
  lists and strings — either compose into a run or raise a ``ConfigError`` that names the field;
  never another exception.
- Random env actions — valid, NaN, ±inf, out of bounds, wrong shape or type, missing agents, an
  unknown agent — give a valid step or a ValueError naming the agent, with nothing applied.
- Random strategy × CL method × benchmark × model × replicas combinations train a few steps with
  finite losses or refuse with a ConfigError before any step.

What they found and was fixed: Hydra's own errors (and OmegaConf's assertion for a field of a null
group, Hydra's ValueError for a group set to a number) escaped ``compose`` unconverted; ``attention``
on a conv model raised a ValueError; a population of a one-channel conv model with EWC failed inside
``vmap`` (its inputs were made channels-last because a one-channel weight looks channels-last).
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from agentnet.composition import compose, to_run_config
from agentnet.config import ConfigError
from tests.conftest import REPO, compose_config

GROUPS = {group: sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml")) for group in ("strategy", "model", "cl", "benchmark")}


def _fields() -> list[str]:
    """Every leaf field of a config composed with every group (a continual run with a CL method)."""
    node = OmegaConf.to_container(compose(["benchmark=pmnist_quick", "cl=ewc"]), resolve=True)

    def leaves(n, prefix=""):
        if isinstance(n, dict):
            for key, value in n.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1]

    return [k for k in leaves(node) if not k.startswith("hydra")]


FIELDS = _fields() + ["trainer.no_such_field", "+model.no_such_field", "+no_such_group.key", "strategy.no_such_field"]


def _literal(value) -> str:
    """A value written as a command-line override."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf else repr(value))
    return str(value)


VALUES = st.one_of(
    st.integers(-10**6, 10**9),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.booleans(),
    st.sampled_from(["null", "abc", "[]", "[0]", "[1,2]", "[-3,5]", "''", "{}", "auto", "cuda", "bf16", "none", "global"]),
).map(_literal)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    groups=st.fixed_dictionaries({g: st.sampled_from([*options, "no_such_option", None]) for g, options in GROUPS.items()}),
    overrides=st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3),
)
def test_random_overrides_compose_or_name_the_field(groups, overrides):
    chosen = [f"{group}={option}" for group, option in groups.items() if option is not None]
    typed = [f"{key}={value}" for key, value in overrides]
    try:
        to_run_config(compose([*chosen, *typed]))
    except ConfigError as error:
        message = str(error)
        # The field itself, or a field of its group that it conflicts with ("model.worker_size=52: must
        # divide every hidden width"), or the group option chosen.
        named = []
        for key, _ in overrides:
            key = key.lstrip("+")
            named += [key, key.split(".")[-1]] + ([key.split(".")[0] + "."] if "." in key else [])
        named += [f"{g}/{o}" for g, o in groups.items() if o] + [f"{g}=" for g, o in groups.items() if o] + [f"{g}." for g, o in groups.items() if o]
        assert any(name in message for name in named), (chosen, typed, message)


# -- env actions ---------------------------------------------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from envs import neural_collective_v0  # noqa: E402
from tests.conftest import data_root  # noqa: E402


@pytest.fixture(scope="module", params=["scale", "delta"])
def env(request):
    env = neural_collective_v0.parallel_env(action_mode=request.param, hidden=(20, 20), data_subset=640, batch_size=64,
                                           data_root=str(data_root()), max_cycles=10**6)
    env.reset(seed=0)
    return env


CORRUPT = st.sampled_from(["nan", "inf", "-inf", "huge", "negative", "shape+1", "scalar", "matrix", "string", "none", "int", "bool", "float64"])


def _corrupted(good: np.ndarray, how: str):
    if how in ("nan", "inf", "-inf", "huge", "negative"):
        bad = good.copy()
        bad.flat[0] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e30, "negative": -1e6}[how]
        return bad
    return {"shape+1": np.zeros(good.size + 1, np.float32), "scalar": np.float32(good.flat[0]), "matrix": good.reshape(1, -1),
            "string": "fast", "none": None, "int": good.astype(np.int64), "bool": good.astype(bool),
            "float64": good.astype(np.float64)}[how]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_actions_step_or_name_the_agent_and_change_nothing(env, data):
    """Every agent's action valid, corrupted (NaN, ±inf, out of bounds, wrong shape or type), missing,
    or joined by an unknown agent: a valid step, or a ValueError naming what is wrong with nothing applied."""
    if not env.agents:  # the episode ended (the run's step budget): a new one
        env.reset(seed=0)
    agents = list(env.agents)
    actions = {}
    suspects = []  # agents whose action is corrupted or missing, and the unknown one
    for agent in agents:
        space = env.action_space(agent)
        fraction = data.draw(st.floats(0.0, 1.0), label=f"{agent} value")
        good = np.clip((fraction * (space.high - space.low) + space.low).astype(np.float32), space.low, space.high)  # within, in float32
        kind = data.draw(st.sampled_from(["valid"] * 6 + ["corrupt", "missing"]), label=agent)
        if kind == "valid":
            actions[agent] = good
        elif kind == "corrupt":
            actions[agent] = _corrupted(good, data.draw(CORRUPT))
            suspects.append(agent)
        else:
            suspects.append(agent)
    extra = data.draw(st.booleans())
    if extra:
        actions["worker_999"] = np.ones(1, np.float32)
        suspects.append("worker_999")
    before = [p.detach().clone() for p in env.model.parameters()]
    step = env.trainer.step
    try:
        env.step(actions)
    except ValueError as error:
        message = str(error)
        assert any(f"{a}" in message for a in suspects), (suspects, message)
        assert env.trainer.step == step and all(torch.equal(p, q) for p, q in zip(before, env.model.parameters()))
    else:
        assert env.trainer.step == step + 1
        assert not extra and set(actions) == set(agents)
        for agent, action in actions.items():
            value = np.asarray(action, dtype=np.float64)
            assert np.all(np.isfinite(value)), f"{agent}: a non-finite action was applied"


# -- combinations -----------------------------------------------------------------------------------
from agentnet.session import build_session, prepare_run  # noqa: E402


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(strategy=st.sampled_from(GROUPS["strategy"]), method=st.sampled_from(GROUPS["cl"]),
       benchmark=st.sampled_from([*GROUPS["benchmark"], None]), model=st.sampled_from(GROUPS["model"]), replicas=st.sampled_from([1, 2]))
def test_valid_combinations_train_with_finite_losses_or_refuse_clearly(mnist, strategy, method, benchmark, model, replicas):
    """Any strategy x CL method x benchmark (or none) x model: a few steps with finite losses, or a
    ConfigError before any step that names what does not combine."""
    overrides = [f"strategy={strategy}", f"cl={method}", f"model={model}", f"replicas={replicas}", "trainer.batch_size=16",
                 "trainer.progress=false", "trainer.checkpoint=false", "device=cpu", "output_dir=null", "data.test_subset=64",
                 "trainer.eval_batch_size=64"]
    if benchmark is not None:
        overrides += [f"benchmark={benchmark}", "benchmark.num_tasks=2", "benchmark.samples_per_task=32", "benchmark.epochs_per_task=1",
                      "benchmark.iterations_per_task=null"]
    else:
        overrides += ["data.subset=64", "trainer.epochs=1"]
    try:
        run, _, _, data = prepare_run(compose_config(*overrides), mnist)
        session = build_session(run, data)
    except ConfigError as error:
        assert any(name in str(error) for name in ("strategy", "cl", "model", "benchmark", "replicas", "data", "trainer")), str(error)
        return
    session.run_all()
    assert session.trainer.step > 0
    assert all(math.isfinite(entry["train_loss"]) for entry in session.trainer.history), session.trainer.history
