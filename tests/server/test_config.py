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


def test_development_credentials_are_named_until_both_are_replaced(tmp_path):
    local = load_config("configs/local.toml", env={})
    assert local.development_credentials() == [
        "RINGSIDE_SECRET (cluster.secret)",
        "RINGSIDE_ADMIN_TOKEN (cluster.admin_token)",
    ]
    # A config that sets its own secret but forgets the admin token still has the public one.
    config = tmp_path / "prod.toml"
    config.write_text('[cluster]\nsecret = "s3cret-of-this-studio"\n')
    assert load_config(config, env={}).development_credentials() == [
        "RINGSIDE_ADMIN_TOKEN (cluster.admin_token)"
    ]
    env = {"RINGSIDE_SECRET": "a", "RINGSIDE_ADMIN_TOKEN": "b"}
    assert load_config(config, env=env).development_credentials() == []


def test_processes_warn_at_start_about_development_credentials(caplog, tmp_path):
    from server.cli import _warn_development_credentials

    with caplog.at_level("WARNING"):
        _warn_development_credentials(load_config("configs/local.toml", env={}))
    assert "RINGSIDE_SECRET" in caplog.text and "RINGSIDE_ADMIN_TOKEN" in caplog.text
    caplog.clear()
    config = tmp_path / "prod.toml"
    config.write_text('[cluster]\nsecret = "s3cret"\nadmin_token = "t0ken"\n')
    with caplog.at_level("WARNING"):
        _warn_development_credentials(load_config(config, env={}))
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("text", "env", "says"),
    [
        ("[gatway]\nport = 1\n", {}, "unknown sections ['gatway']"),
        ('[cluster]\nsecrett = "x"\n', {}, "unknown keys in [cluster]: ['secrett']"),
        ("", {"RINGSIDE_NODE_FLUSH_INTERVL_MS": "50"}, "RINGSIDE_NODE_FLUSH_INTERVL_MS"),
        ("[gateway]\nmax_frame_bytes = -5\n", {}, "max_frame_bytes = -5: must be 0 or more"),
        ("", {"RINGSIDE_GATEWAY_MAX_FRAME_BYTES": "-5"}, "must be 0 or more"),
    ],
)
def test_typos_and_negative_values_are_refused_by_name(tmp_path, text, env, says):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(config, env=env)
    assert says in str(err.value)


def test_config_is_taken_before_or_after_the_command():
    from server.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--config", "a.toml", "token", "p"]).config == "a.toml"
    assert parser.parse_args(["token", "p", "--config", "b.toml"]).config == "b.toml"
    assert parser.parse_args(["status", "--config", "c.toml", "--json"]).config == "c.toml"
    assert parser.parse_args(["token", "p"]).config == parser.get_default("config")


@pytest.mark.parametrize(
    "toml",
    [
        '[[nodes]]\nname = "n1"\nhost = "0.0.0.0"',
        '[[nodes]]\nname = "n1"\nhost = "::"',
        '[gateway]\nhost = "0.0.0.0"',
    ],
)
def test_a_wildcard_host_is_refused_with_what_to_do(tmp_path, toml):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match="routable address.*listen_host"):
        load_config(str(path), env={})


def test_the_gateway_listens_on_every_interface_and_admits_a_monitoring_network(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[gateway]\nhost = "10.0.0.20"\nlisten_host = "0.0.0.0"\nadmin_networks = "10.0.9.0/24"')
    gateway = load_config(str(path), env={}).gateway
    assert gateway.listen_host == "0.0.0.0"
    assert [str(n) for n in gateway.admin_network_list()] == ["10.0.9.0/24"]
    path.write_text('[gateway]\nadmin_networks = "10.0.9.0/33"')
    with pytest.raises(ConfigError, match="admin_networks"):
        load_config(str(path), env={})
