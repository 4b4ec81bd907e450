"""End to end with the real default model: SmolLM2-135M-Instruct answers a question on Discord."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import Start, option, pings_nobody, reply_done, stored
from tests.fakediscord import FakeDiscord
from tests.models_io.conftest import cache_dir, default_gguf, default_model_dir  # noqa: F401

MAX_CONTEXT = 512  # small KV buffers: a quick export and load


@pytest.fixture(scope="session", params=["fp32", "int8"])  # int8: what `make run` serves on a CPU
def default_registry(request, default_model_dir: Path, tmp_path_factory):  # noqa: F811
    """A registry whose active version is the default model, fused, 512 tokens of context."""
    from export.pipeline import ExportRequest, export_checkpoint
    from export.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("default-registry"))
    job = ExportRequest(
        default_model_dir,
        "smollm2",
        precision=request.param,
        flavour="fused",
        max_context=MAX_CONTEXT,
        progress=False,
    )
    info, _ = export_checkpoint(job, registry)
    registry.use(info.ref)
    return registry


@pytest.mark.slow
async def test_default_model_knows_the_capital_of_france(
    fake: FakeDiscord,
    start_bot: Start,
    default_registry,
) -> None:
    bot = await start_bot(model_registry=default_registry.root, engine_slots=1)
    assert bot.backend.model.ref == "smollm2@1"
    assert bot.backend.model.max_context == MAX_CONTEXT
    alice = fake.add_user("alice")
    channel = fake.text_channel_ids[0]

    options = [option("temperature", 0.0, 10), option("max_tokens", 24, 4)]
    interaction = await fake.dispatch_interaction(
        channel, alice, "settings", [{"type": 1, "name": "set", "options": options}]
    )
    await fake.wait_for(lambda r: r.path.startswith(f"/interactions/{interaction['id']}/"))
    settings = await bot.chat.get_settings(channel)
    assert (settings.temperature, settings.max_new_tokens) == (0.0, 24)  # greedy: a stable answer

    question = f"<@{fake.bot_user['id']}> What is the capital of France?"
    await fake.dispatch_message(channel, alice, question, [fake.bot_user])
    await reply_done(fake, bot, channel)

    posts = fake.find("POST", f"/channels/{channel}/messages")
    edits = fake.find("PATCH", f"/channels/{channel}/messages/")
    assert len(posts) == 1 and edits, "expected one message, then edits while streaming"
    for request in posts + edits:
        assert pings_nobody(request.json["allowed_mentions"]), request
    rows = await stored(bot, channel)
    assert [r.role for r in rows] == ["user", "assistant"]
    final = fake.messages[int(rows[1].discord_message_id)]["content"]
    assert "Paris" in final, final
    assert rows[1].model_version == "smollm2@1" and rows[1].status != "interrupted"
