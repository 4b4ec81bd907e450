"""A job's data: the server's dialogues as export-dialogues writes them, split by conversation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.dialogues import MAX_EXCHANGES, conversations, exchanges, write_jsonl
from bot.finetune.errors import FinetuneError
from bot.privacy import PrivacyService
from bot.storage import repo

if TYPE_CHECKING:
    from bot.storage.db import Database

MIN_CONVERSATIONS = 4  # below this a job is refused: nothing useful to learn, nothing to hold out
HELD_OUT_FRACTION = 0.2
TRAIN_FILE, HELD_OUT_FILE = "train.jsonl", "heldout.jsonl"


@dataclass(frozen=True)
class JobData:
    train: Path
    held_out: Path
    summary: dict[str, int]  # conversations, train, held_out, turns, channels, excluded_users


def held_out(record: list[dict]) -> bool:
    """Whether a conversation goes to the held-out split: by a hash of its content, so the same
    conversation always lands on the same side (never split turn by turn)."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


def split(records: list[list[dict]]) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held-out) by conversation; at least one on each side."""
    train = [r for r in records if not held_out(r)]
    kept = [r for r in records if held_out(r)]
    if not kept:
        kept, train = train[-1:], train[:-1]
    if not train:
        train, kept = kept[:1], kept[1:]
    return train, kept


async def collect(
    db: Database, guild_id: int, channels: Collection[int] = ()
) -> tuple[list[list[dict]], dict[str, int]]:
    """The server's conversations (of `channels` when given), opted-out users left out."""
    excluded = await PrivacyService(db).opted_out_users()
    records: list[list[dict]] = []
    used = 0
    async with db.session() as s:
        for channel in await repo.guild_channels(s, guild_id):
            if channels and channel.id not in channels:
                continue
            pairs = exchanges(await repo.dialogue_rows(s, channel.id), excluded)
            used += bool(pairs)
            records += conversations(pairs, channel.persona, MAX_EXCHANGES)
    turns = sum(sum(m["role"] != "system" for m in r) for r in records)
    return records, {"conversations": len(records), "turns": turns, "channels": used,
                     "excluded_users": len(excluded)}  # fmt: skip


async def prepare(
    db: Database, guild_id: int, folder: Path, channels: Collection[int] = ()
) -> JobData:
    """Write train.jsonl and heldout.jsonl into `folder`; FinetuneError below the minimum."""
    records, summary = await collect(db, guild_id, channels)
    check_amount(summary["conversations"])
    train, kept = split(records)
    data = JobData(folder / TRAIN_FILE, folder / HELD_OUT_FILE,
                   summary | {"train": len(train), "held_out": len(kept)})  # fmt: skip
    write_jsonl(data.train, train)
    write_jsonl(data.held_out, kept)
    return data


def check_amount(n: int) -> None:
    if n < MIN_CONVERSATIONS:
        raise FinetuneError(
            f"not enough stored conversations to fine-tune: {n} (at least {MIN_CONVERSATIONS}; "
            "talk with the bot more, or include more channels)"
        )
