"""Settings are defined once: every default lives in the config schema (rl/config.py); runtime
settings classes are built from it by rl/settings.py and declare no default that differs."""
import dataclasses
import inspect

import pytest

from rl.config import TrainConfig
from rl.ds_worker import LearnerSettings
from rl.learner import AlgoSettings
from rl.settings import algo_settings, engine_config, learner_settings, rollout_settings
from rollout.engine import EngineConfig
from rollout.env_pool import EnvPool
from rollout.episodes import RolloutSettings

# runtime class -> (schema section, {runtime name: schema name} where they differ, runtime fields
# computed from several keys rather than copied from one)
SOURCES = {
    LearnerSettings: ("learner", {}, {"seed"}),
    AlgoSettings: ("algorithm", {}, {"loss_norm_tokens", "kl_coef"}),
    RolloutSettings: ("rollout", {"max_context": "max_model_len"}, set()),
    EngineConfig: ("rollout", {"backend": "engine_backend", "cpus": "engine_cpus"}, {"model", "dtype", "seed"}),
}
BUILDERS = {LearnerSettings: learner_settings, AlgoSettings: algo_settings, RolloutSettings: rollout_settings,
            EngineConfig: engine_config}
ENV_POOL_KEYS = ("num_actors", "envs_per_actor", "num_cpus_per_actor", "step_timeout_s", "call_timeout_s", "placement")


def schema_default(section: str, key: str):
    value = getattr(getattr(TrainConfig(), section), key)
    return tuple(value) if isinstance(value, list) else value


def declared_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("cls", list(SOURCES), ids=lambda c: c.__name__)
def test_no_runtime_default_differs_from_the_schema(cls):
    section, renamed, derived = SOURCES[cls]
    for name, value in declared_defaults(cls).items():
        assert name not in derived, f"{cls.__name__}.{name} is computed by rl/settings.py; it must not declare a default"
        key = renamed.get(name, name)
        assert value == schema_default(section, key), f"{cls.__name__}.{name}={value!r} but {section}.{key} defaults to {schema_default(section, key)!r}"


def test_env_pool_declares_no_env_default():
    params = inspect.signature(EnvPool.__init__).parameters
    for key in ENV_POOL_KEYS:
        assert params[key].default is inspect.Parameter.empty, f"EnvPool({key}=...) re-declares env.{key}'s default"


@pytest.mark.parametrize("cls", list(SOURCES), ids=lambda c: c.__name__)
def test_built_settings_carry_the_schema_defaults(cls):
    """Every field comes from the schema: copied under its (possibly renamed) key, or computed."""
    section, renamed, derived = SOURCES[cls]
    built = BUILDERS[cls]()
    for f in dataclasses.fields(cls):
        if f.name in derived:
            continue
        key = renamed.get(f.name, f.name)
        value = getattr(built, f.name)
        assert (tuple(value) if isinstance(value, list) else value) == schema_default(section, key), f.name


def test_derived_fields_follow_their_keys():
    cfg = TrainConfig()
    cfg.seed, cfg.rollout.max_tokens, cfg.rollout.max_turns = 7, 5, 3
    cfg.algorithm.kl_coef, cfg.algorithm.kl_in_reward = 0.1, True
    assert learner_settings(cfg).seed == 7
    a = algo_settings(cfg)
    assert a.loss_norm_tokens == 15.0 and a.kl_coef == 0.0  # KL in the reward: no loss term
    e = engine_config(cfg, index=2)
    assert (e.model, e.dtype, e.seed) == (cfg.policy.path, cfg.policy.engine_dtype, 9)


def test_overrides_replace_fields_and_unknown_ones_fail():
    assert learner_settings(lr=0.5, zero_stage=3).lr == 0.5
    with pytest.raises(TypeError, match="not_a_field"):
        rollout_settings(not_a_field=1)
