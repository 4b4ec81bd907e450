"""Settings: environment, .env, TOML file, derived paths, secrets, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.config import BotConfig, ConfigError, get_settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path: Path):
    """No stray configuration from the machine: empty cwd, no BOT_* or known variables."""
    monkeypatch.chdir(tmp_path)
    for name in [*BotConfig.model_fields, "BOT_CONFIG"]:
        monkeypatch.delenv(name.upper(), raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_derive_from_data_dir(monkeypatch):
    monkeypatch.setenv("DATA_DIR", "/srv/bot")
    s = load_settings()
    assert s.database_url == "sqlite+aiosqlite:////srv/bot/bot.db"
    assert s.model_registry == Path("/srv/bot/registry")
    assert s.export_allowed_dir == Path("/srv/bot/checkpoints")
    assert s.discord_token is None and s.model is None and s.device == "auto"


def test_environment_lists_and_case(monkeypatch):
    monkeypatch.setenv("ADMIN_USER_IDS", "12, 34,56")
    monkeypatch.setenv("command_guild_ids", "7")
    monkeypatch.setenv("DEVICE", "cpu")
    s = load_settings()
    assert s.admin_user_ids == [12, 34, 56]
    assert s.command_guild_ids == [7]
    assert s.device == "cpu"


def test_engine_options_follow_the_settings(monkeypatch):
    defaults = load_settings().engine_options()
    assert defaults["threads"] is None and defaults["spin"] is False  # all cores, no spinning
    monkeypatch.setenv("ENGINE_THREADS", "3")
    monkeypatch.setenv("ENGINE_SPIN", "true")
    monkeypatch.setenv("ENGINE_SLOTS", "4")
    options = load_settings(data_dir="/srv/bot").engine_options()
    assert options == {
        "registry": Path("/srv/bot/registry"),
        "device": "auto",
        "slots": 4,
        "max_queue": 64,
        "threads": 3,
        "spin": True,
    }


def test_token_never_shown_in_clear(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "very-secret-token")
    s = load_settings()
    assert s.discord_token is not None
    assert s.discord_token.get_secret_value() == "very-secret-token"
    assert "very-secret-token" not in repr(s) and "very-secret-token" not in str(s)


def test_dotenv_and_toml_with_environment_winning(monkeypatch, tmp_path: Path):
    (tmp_path / ".env").write_text("ENGINE_SLOTS=3\nMODEL=from-dotenv\n")
    toml = tmp_path / "bot.toml"
    toml.write_text(
        'engine_slots = 5\nmodel = "from-toml"\nuser_rate_per_min = 2\nadmin_user_ids = [9]\n'
    )
    monkeypatch.setenv("BOT_CONFIG", str(toml))
    monkeypatch.setenv("MODEL", "from-env")
    s = load_settings()
    assert s.model == "from-env"  # environment over .env over TOML
    assert s.engine_slots == 3  # .env over TOML
    assert s.user_rate_per_min == 2 and s.admin_user_ids == [9]  # TOML only


def test_missing_toml_file_is_one_line_error(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("BOT_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("ENGINE_SLOTS", "many", "ENGINE_SLOTS"),
        ("DEVICE", "tpu", "DEVICE"),
        ("ADMIN_USER_IDS", "1,x", "ADMIN_USER_IDS"),
        ("USER_RATE_PER_MIN", "-1", "USER_RATE_PER_MIN"),
        ("CHANNEL_RATE_PER_MIN", "-5", "CHANNEL_RATE_PER_MIN"),
        ("REQUEST_TIMEOUT_S", "0", "REQUEST_TIMEOUT_S"),
        ("REQUEST_TIMEOUT_S", "inf", "REQUEST_TIMEOUT_S"),  # overflowed the scheduler's wait
        ("REQUEST_TIMEOUT_S", "1e300", "REQUEST_TIMEOUT_S"),
        ("REQUEST_TIMEOUT_S", "nan", "REQUEST_TIMEOUT_S"),
        ("SHUTDOWN_GRACE_S", "inf", "SHUTDOWN_GRACE_S"),
        ("SHUTDOWN_GRACE_S", "-1", "SHUTDOWN_GRACE_S"),
        ("EDIT_INTERVAL_S", "inf", "EDIT_INTERVAL_S"),
        ("EDIT_INTERVAL_S", "-0.5", "EDIT_INTERVAL_S"),
        ("ENGINE_THREADS", "100000000", "ENGINE_THREADS"),
        ("ENGINE_THREADS", "-1", "ENGINE_THREADS"),
        ("ENGINE_SLOTS", "0", "ENGINE_SLOTS"),
        ("ENGINE_MAX_QUEUE", "0", "ENGINE_MAX_QUEUE"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_zero_rate_limits_mean_no_limit_and_load(monkeypatch):
    monkeypatch.setenv("USER_RATE_PER_MIN", "0")
    monkeypatch.setenv("CHANNEL_RATE_PER_MIN", "0")
    s = load_settings()
    assert (s.user_rate_per_min, s.channel_rate_per_min) == (0, 0)


def test_get_settings_is_cached(monkeypatch):
    monkeypatch.setenv("ENGINE_SLOTS", "2")
    first = get_settings()
    monkeypatch.setenv("ENGINE_SLOTS", "4")
    assert get_settings() is first and first.engine_slots == 2
    get_settings.cache_clear()
    assert get_settings().engine_slots == 4


ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"
KEY_LINE = re.compile(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$")


def test_env_example_lists_every_setting_with_its_default(tmp_path: Path):
    """Every key of Settings is in .env.example, once, and no other; setting every key to the
    value shown (but the unset-by-default ones, shown with an example) changes nothing."""
    entries = [m.groups() for m in map(KEY_LINE.match, ENV_EXAMPLE.read_text().splitlines()) if m]
    keys = sorted(key for key, _ in entries)
    assert keys == sorted(name.upper() for name in BotConfig.model_fields)
    defaults = BotConfig(_env_file=None)
    unset = {name.upper() for name, value in defaults if value is None}
    assert unset == {"DISCORD_TOKEN", "MODEL", "DISCORD_GATEWAY_URL"}
    examples = unset - {"DISCORD_TOKEN"}  # DISCORD_TOKEN= (empty) is unset too
    env_file = tmp_path / "example.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in entries if k not in examples))
    assert BotConfig(_env_file=env_file).model_dump() == defaults.model_dump()


def test_secrets_are_the_token_and_the_url_passwords():
    """What bot.logs redacts: the token and any password in REDIS_URL or DATABASE_URL."""
    config = BotConfig(
        _env_file=None,
        discord_token="tok-123456",
        redis_url="redis://:r-pass-789@127.0.0.1:6379/0",
        database_url="postgresql+asyncpg://bot:db-pass-456@127.0.0.1/bot",
    )
    assert config.secrets() == ["tok-123456", "r-pass-789", "db-pass-456"]
    assert BotConfig(_env_file=None).secrets() == []
