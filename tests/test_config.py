"""Configuration: defaults, the file, environment overrides, and errors that name the key."""

from pathlib import Path

import pytest

from asyncjobs import config
from asyncjobs.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_empty_file_gives_the_protocol_defaults(tmp_path):
    """Every key has a default, so an empty file works."""
    path = tmp_path / "c.toml"
    path.write_text("")
    cfg = config.load(path, environ={})
    assert cfg.server.port == 8080 and cfg.queue.workers == 8 and cfg.store.synchronous == "full"
    assert cfg.jobs.retention == 86400 and cfg.protocol.monitor == "rest"
    assert cfg.tasks.modules == ["asyncjobs.builtin"]


def test_shipped_config_matches_the_defaults():
    """The top-level config.toml is valid and spells out the defaults."""
    assert config.load(ROOT / "config.toml", environ={}) == config.Config()


def test_environment_overrides_the_file_and_flags_override_both(tmp_path):
    """ASYNCJOBS_<SECTION>_<KEY> beats the file; explicit overrides (flags) beat the environment."""
    path = tmp_path / "c.toml"
    path.write_text("[queue]\nworkers = 2\n[server]\nport = 9000\n")
    env = {"ASYNCJOBS_QUEUE_WORKERS": "16", "ASYNCJOBS_PROTOCOL_MONITOR": "flow",
           "ASYNCJOBS_STORE_PATH": "/tmp/x.db", "ASYNCJOBS_URL": "http://client.only"}
    cfg = config.load(path, environ=env, overrides={"server": {"port": 1234}})
    assert cfg.queue.workers == 16 and cfg.protocol.monitor == "flow"
    assert cfg.store.path == "/tmp/x.db" and cfg.server.port == 1234


@pytest.mark.parametrize("text,named", [
    ("[queue]\nwrokers = 2\n", "queue.wrokers"),
    ('[queue]\nworkers = "many"\n', "queue.workers"),
    ("[queue]\nworkers = 0\n", "queue.workers"),
    ("[jobs]\nretention = -1\n", "jobs.retention"),
    ('[store]\nsynchronous = "off"\n', "store.synchronous"),
    ('[protocol]\nmonitor = "azure"\n', "protocol.monitor"),
    ("[nope]\nx = 1\n", "[nope]"),
    ("[tasks]\nmodules = 3\n", "tasks.modules"),
    ('[tasks.sleep]\ntimeuot = 3\n', "tasks.sleep.timeuot"),
    ("[server]\nport = true\n", "server.port"),
    ("[server]\nport = 70000\n", "server.port: must be at most 65535"),
    ("[jobs]\nmax_age = nan\n", "jobs.max_age: must be a finite number"),
    ("[jobs]\nmax_age = inf\n", "jobs.max_age: must be a finite number"),
    ("[jobs]\nretention = nan\n", "jobs.retention"),
    ("[queue]\nshutdown_grace = nan\n", "queue.shutdown_grace"),
    ("[tasks.sleep]\nconcurrency = 0\n", "tasks.sleep.concurrency: must be positive"),
    ("[tasks.sleep]\ntimeout = 0\n", "tasks.sleep.timeout: must be positive"),
    ('[store]\npath = ""\n', "store.path: must name a file"),
    ('[store]\npath = "/"\n', "store.path: must name a file"),
    ("not toml at all [", "not valid TOML"),
])
def test_errors_name_the_key(tmp_path, text, named):
    """A wrong key or value stops the load with a message naming it."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=__import__("re").escape(named)):
        config.load(path, environ={})


def test_bad_environment_value_is_named(tmp_path):
    """An override from the environment is checked like the file."""
    with pytest.raises(ConfigError, match="queue.workers"):
        config.load(None, environ={"ASYNCJOBS_QUEUE_WORKERS": "abc"})


def test_a_misspelt_section_in_the_environment_is_named_and_the_clients_variables_pass():
    """ASYNCJOBS_SEVER_PORT is no override of anything: it stops the load rather than being ignored; the
    client's ASYNCJOBS_URL and ASYNCJOBS_TOKEN are not the server's and pass."""
    with pytest.raises(ConfigError, match="ASYNCJOBS_SEVER_PORT"):
        config.load(None, environ={"ASYNCJOBS_SEVER_PORT": "9000"})
    assert config.load(None, environ={"ASYNCJOBS_URL": "http://x", "ASYNCJOBS_TOKEN": "t"}) == config.Config()


def test_a_config_path_that_is_a_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        config.load(tmp_path, environ={})


def test_missing_file_is_an_error(tmp_path):
    """An explicit config path that does not exist is an error, not a silent default."""
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "missing.toml", environ={})


def test_db_flag_names_a_sqlite_file_or_a_server_and_wins_over_the_file():
    """--db: a postgresql:// URL sets store.url, anything else store.path and clears a url from the file."""
    from asyncjobs.cli import _flag_overrides, build_parser

    def flags(*argv: str) -> dict:
        return _flag_overrides(build_parser().parse_args(["serve", *argv]))

    assert flags("--db", "postgresql://u@h/db")["store"] == {"url": "postgresql://u@h/db"}
    assert flags("--db", "jobs.db")["store"] == {"url": "", "path": "jobs.db"}
    assert "store" not in flags()
    assert flags("--db", "postgres://u@h/db")["store"] == {"url": "postgres://u@h/db"}  # the short scheme too


def test_store_url_comes_from_the_environment_too():
    """ASYNCJOBS_STORE_URL sets store.url, and --db still wins over it."""
    loaded = config.load(None,
                         environ={"ASYNCJOBS_STORE_URL": "postgresql://u@h/env"})
    assert loaded.store.url == "postgresql://u@h/env"
    loaded = config.load(None, environ={"ASYNCJOBS_STORE_URL": "postgresql://u@h/env"},
                         overrides={"store": {"url": "", "path": "flag.db"}})
    assert (loaded.store.url, loaded.store.path) == ("", "flag.db")


def test_store_url_is_checked_and_a_store_can_be_handed_in(tmp_path):
    """A store.url that is not PostgreSQL is named; one that is selects the PostgreSQL store; an App takes
    a store built elsewhere (the seam a backend plugs into)."""
    from asyncjobs.app import App
    from asyncjobs.store import SQLiteStore
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="store.url: expected postgresql"):
        App(make_config(tmp_path, store={"url": "mysql://x"}))
    from asyncjobs.postgres import PostgresStore

    assert isinstance(App(make_config(tmp_path, store={"url": "postgresql://u@127.0.0.1/db"})).store, PostgresStore)
    mine = SQLiteStore(tmp_path / "mine.db")
    assert App(make_config(tmp_path), store=mine).store is mine


def test_cluster_keys_are_accepted_and_processes_on_sqlite_are_refused(capsys, tmp_path):
    """[cluster] lease/heartbeat load; --processes N > 1 on a SQLite store stops with one line, exit 2."""
    from asyncjobs import cli

    loaded = config.from_dict({"cluster": {"lease": 20, "heartbeat": 5}})
    assert (loaded.cluster.lease, loaded.cluster.heartbeat) == (20.0, 5.0)
    with pytest.raises(ConfigError, match="cluster.lease"):
        config.from_dict({"cluster": {"lease": 0}})
    from asyncjobs.app import heartbeat_s

    assert heartbeat_s(config.from_dict({"cluster": {"lease": 3}})) == 1.0  # a third of a short lease
    assert heartbeat_s(config.from_dict({"cluster": {"lease": 60, "heartbeat": 5}})) == 5.0
    assert cli.main(["serve", "--processes", "2", "--db", str(tmp_path / "one.db")]) == 2
    assert "--processes" in capsys.readouterr().err
    assert cli.main(["serve", "--processes", "0", "--db", "postgresql://u@127.0.0.1:1/db"]) == 2
    assert "--processes" in capsys.readouterr().err


def test_a_listening_address_in_a_url_has_ipv6_in_brackets():
    """The "listening on" line is a URL a client can use: http://[::1]:8080, not http://::1:8080."""
    assert config.url_host("::1") == "[::1]" and config.url_host("127.0.0.1") == "127.0.0.1"


def test_a_text_setting_from_the_environment_is_taken_as_it_is():
    """ASYNCJOBS_STORE_PATH=1234 names the file 1234 (not the number 1234, refused as no text); a number,
    true or a date in any text setting stays text, and the other settings still read TOML values."""
    loaded = config.load(None, environ={"ASYNCJOBS_STORE_PATH": "1234", "ASYNCJOBS_SERVER_HOST": "true",
                                        "ASYNCJOBS_FILES_DIR": "2024-01-01", "ASYNCJOBS_QUEUE_WORKERS": "16",
                                        "ASYNCJOBS_CALLBACKS_ALLOW_HOSTS": '["hooks.example"]'})
    assert (loaded.store.path, loaded.server.host, loaded.files.dir) == ("1234", "true", "2024-01-01")
    assert loaded.queue.workers == 16 and loaded.callbacks.allow_hosts == ["hooks.example"]
    # A quoted value (as a Docker env file passes it on, quotes and all) is the text inside the quotes.
    assert config.load(None, environ={"ASYNCJOBS_STORE_PATH": '"jobs.db"'}).store.path == "jobs.db"
