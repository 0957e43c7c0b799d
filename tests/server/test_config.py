import pytest

from server.config import ConfigError, load_config


def test_local_config_loads_with_env_overrides():
    config = load_config(
        "configs/local.toml",
        env={"RINGSIDE_NODE_FLUSH_INTERVAL_MS": "50", "REDIS_URL": "redis://x:1/0", "LOG_LEVEL": "debug"},
    )
    assert config.node.flush_interval_ms == 50
    assert config.redis.url == "redis://x:1/0" and not config.redis.embedded
    assert config.node_names == ["n1", "n2", "n3"] and config.all_node_names[-1] == "n4"
    assert config.log_level == "debug"


@pytest.mark.parametrize(
    "env",
    [
        {"RINGSIDE_NODE_FLUSH_INTERVAL_MS": "soon"},
        {"LOG_LEVEL": "loud"},
        {"RINGSIDE_GOSSIP_KEYS": "not base64!"},
    ],
)
def test_bad_values_are_clear_errors(env):
    with pytest.raises(ConfigError):
        load_config("configs/local.toml", env=env)


def test_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[node]\nflush_intervall_ms = 10\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(path, env={})
