"""A server's stored conversations as training data: the `.jsonl` that `models finetune` reads.

Each line is {"messages": [{"role", "content"}, ...]}: the channel's persona as the system
message (if it has one), then user/assistant turns as the bot's prompts show them (speakers
named when several users talk). Only finished, remembered turns answered by a finished reply
are kept; opted-out users' turns and the bot's replies to them are left out; a channel's
exchanges are cut into conversations of at most `max_exchanges` exchanges.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

from bot.prompt import chat_messages
from bot.storage import repo
from bot.storage.models import Message, Role
from bot.turns import Turn

if TYPE_CHECKING:
    from bot.storage.db import Database

MAX_EXCHANGES = 8


def exchanges(rows: Sequence[Message], excluded: set[int]) -> list[tuple[Message, Message]]:
    """(user turn, the bot's reply) pairs of one channel's rows in order; a user turn without a
    reply, and the turns of `excluded` users with their replies, are left out."""
    pairs = []
    for turn, reply in pairwise(rows):
        if turn.role != Role.USER or reply.role != Role.ASSISTANT:
            continue
        if turn.author_id in excluded or not turn.content.strip() or not reply.content.strip():
            continue
        pairs.append((turn, reply))
    return pairs


def conversations(
    pairs: Sequence[tuple[Message, Message]], persona: str | None, max_exchanges: int
) -> Iterator[list[dict]]:
    """The pairs cut into chunks, each as chat messages (see the module docstring)."""
    for start in range(0, len(pairs), max_exchanges):
        chunk = pairs[start : start + max_exchanges]
        turns = [
            Turn(str(row.role), row.content, row.author_id, row.author_name)
            for pair in chunk
            for row in pair
        ]
        named = len({t.author_id for t in turns if t.role == Role.USER}) > 1
        yield chat_messages(persona, turns, named=named)


async def guild_dialogues(
    db: Database, guild_id: int, excluded: set[int], max_exchanges: int = MAX_EXCHANGES
) -> list[list[dict]]:
    """Every conversation of a server's channels, channel by channel."""
    found: list[list[dict]] = []
    async with db.session() as s:
        for channel in await repo.guild_channels(s, guild_id):
            pairs = exchanges(await repo.dialogue_rows(s, channel.id), excluded)
            found += conversations(pairs, channel.persona, max_exchanges)
    return found


def write_jsonl(path: Path, records: Sequence[list[dict]]) -> None:
    """One {"messages": [...]} per line, written to a temporary file then renamed into place."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for messages in records:
                out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
