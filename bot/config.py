"""Bot settings (pydantic-settings): environment, `.env`, and an optional TOML file (BOT_CONFIG)."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "BOT_CONFIG"  # path of an optional TOML file with the same keys (lower case)

IdList = Annotated[list[int], NoDecode]  # read "1,2,3" from the environment, not JSON


class ConfigError(Exception):
    """Settings that cannot be loaded: one line for the user (exit status 2)."""


class BotConfig(BaseSettings):
    """Every setting of the bot; environment names are the field names in capitals."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
    )

    discord_token: SecretStr | None = None
    data_dir: Path = Path("data")
    database_url: str = ""  # "" -> sqlite+aiosqlite:///{data_dir}/bot.db
    model_registry: Path | None = None  # None -> {data_dir}/registry
    model: str | None = None  # NAME, NAME@N or a version folder; None: the active version
    device: Literal["auto", "cuda", "cpu"] = "auto"
    engine_slots: int = Field(8, ge=1, le=256)
    engine_max_queue: int = Field(64, ge=1)
    engine_threads: int = Field(0, ge=0, le=1024)  # 0: the cores this process may use
    engine_spin: bool = False  # ORT workers spin within a run: faster only with the CPU to itself
    # finite and at most a day: threading and asyncio overflow on longer waits
    request_timeout_s: float = Field(120.0, gt=0, le=86_400, allow_inf_nan=False)
    admin_user_ids: IdList = Field(default_factory=list)
    command_guild_ids: IdList = Field(default_factory=list)
    discord_api_base: str = "https://discord.com/api/v10"
    discord_gateway_url: str | None = None  # None: ask the API (GET /gateway/bot)
    reply_in_dms: bool = True
    reply_to_bots: bool = False  # answer other bots (never itself); mind two bots looping
    # thinking models (Qwen3, SmolLM3): think before answering (on), not (off), or as the chat
    # template does by default (auto); the thinking counts against max_tokens. It is never
    # stored in the history; shown under the reply as a spoiler with SHOW_THINKING=spoiler
    thinking: Literal["off", "on", "auto"] = "off"
    show_thinking: Literal["hidden", "spoiler"] = "hidden"
    history_retention_days: int = Field(0, ge=0, le=36_500)  # 0: keep the history for ever
    export_allowed_dir: Path | None = None  # None -> {data_dir}/checkpoints
    user_rate_per_min: int = Field(6, ge=0)  # 0: no limit
    channel_rate_per_min: int = Field(20, ge=0)  # 0: no limit
    edit_interval_s: float = Field(1.0, ge=0, le=60, allow_inf_nan=False)
    # a reply with no text yet after this long shows an "in line" placeholder; 0: never
    placeholder_after_s: float = Field(2.0, ge=0, le=60, allow_inf_nan=False)
    shutdown_grace_s: float = Field(10.0, ge=0, le=3600, allow_inf_nan=False)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for collectors
    # scale-out (docs/deployment.md): generation by `python -m bot worker` processes via Redis
    redis_url: str = ""  # "": the in-process engine
    redis_prefix: str = Field("bot", pattern=r"^[A-Za-z0-9_.-]+$")  # key prefix of a deployment
    worker_id: str = ""  # "": HOST-PID
    worker_claim_idle_s: float = Field(15.0, gt=0)  # requests idle this long are claimed
    worker_heartbeat_s: float = Field(1.0, gt=0)
    shard_count: int = Field(0, ge=0)  # gateway shards of the whole bot; 0: as Discord advises
    shard_ids: IdList = Field(default_factory=list)  # the shards this process runs; []: all

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: arguments, environment, .env, then the TOML file named by BOT_CONFIG."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml_path = os.environ.get(CONFIG_ENV)
        if toml_path:
            if not Path(toml_path).is_file():
                raise ConfigError(f"{CONFIG_ENV}={toml_path}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @field_validator("admin_user_ids", "command_guild_ids", "shard_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        """Accept "1, 2,3" (environment) as well as a list (TOML, arguments)."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, int):
            return [value]
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_or_upper(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("discord_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _shards(self) -> BotConfig:
        if self.shard_ids and not self.shard_count:
            raise ValueError("SHARD_IDS needs SHARD_COUNT (the bot's total number of shards)")
        bad = [i for i in self.shard_ids if not 0 <= i < self.shard_count]
        if bad or len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError(f"SHARD_IDS must be distinct numbers from 0 to {self.shard_count - 1}")
        return self

    def shards(self) -> tuple[list[int], int] | None:
        """(the shard ids this process runs, the shard count), or None when Discord decides."""
        if not self.shard_count:
            return None
        return (self.shard_ids or list(range(self.shard_count)), self.shard_count)

    @model_validator(mode="after")
    def _derived_defaults(self) -> BotConfig:
        """Paths that default to places under data_dir."""
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'bot.db'}"
        if self.model_registry is None:
            self.model_registry = self.data_dir / "registry"
        if self.export_allowed_dir is None:
            self.export_allowed_dir = self.data_dir / "checkpoints"
        return self

    def secrets(self) -> list[str]:
        """What must never reach a log: the token and the passwords in REDIS_URL and
        DATABASE_URL (given to bot.logs, which redacts them at every level)."""
        values = [self.discord_token.get_secret_value() if self.discord_token else ""]
        for url in (self.redis_url, self.database_url):
            with contextlib.suppress(ValueError):
                values.append(urlsplit(url).password or "")
        return [value for value in values if value]

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of `Engine.start` besides the model reference."""
        return {
            "registry": self.model_registry,
            "device": self.device,
            "slots": self.engine_slots,
            "max_queue": self.engine_max_queue,
            "threads": self.engine_threads or None,
            "spin": self.engine_spin,
        }


def load_settings(**overrides: Any) -> BotConfig:
    """Settings from every source; ConfigError (one line) when a value is invalid."""
    try:
        return BotConfig(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"invalid setting {where.upper()}: {first['msg']}{more}") from None


@lru_cache(maxsize=1)
def get_settings() -> BotConfig:
    """The process-wide settings, read once (tests call get_settings.cache_clear())."""
    return load_settings()
