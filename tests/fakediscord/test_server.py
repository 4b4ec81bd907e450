"""The fake Discord works with a plain, unpatched `discord.Client`: login, READY, events, REST."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from tests.fakediscord import FakeDiscord


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def pointed(fake: FakeDiscord) -> AsyncIterator[FakeDiscord]:
    """Point discord.py at the fake (API base and gateway), restoring the real ones after."""
    base, gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = fake.api_base
    async with (
        aiohttp.ClientSession() as session,
        session.get(fake.api_base + "/gateway/bot") as response,
    ):
        url = (await response.json())["url"]
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
    try:
        yield fake
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


class EchoClient(discord.Client):
    """Answers every message that mentions it with the message's content reversed."""

    def __init__(self) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(intents=intents, guild_ready_timeout=0.05)
        self.ready = asyncio.Event()
        self.seen: list[discord.Message] = []

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append(message)
        if self.user in message.mentions:
            await message.channel.send(message.content[::-1])


async def _run(client: discord.Client) -> asyncio.Task:
    """Start `client` and wait for on_ready; a failed login raises here instead of timing out."""
    task = asyncio.create_task(client.start("fake-token"))
    ready = asyncio.create_task(client.ready.wait())  # type: ignore[attr-defined]
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
    assert ready.done(), "on_ready did not fire"
    return task


async def test_client_logs_in_and_sees_the_guild(pointed: FakeDiscord) -> None:
    client = EchoClient()
    task = await _run(client)
    try:
        assert client.user is not None and client.user.id == int(pointed.bot_user["id"])
        assert client.application_id == pointed.app_id
        guild = client.get_guild(pointed.guild_id)
        assert guild is not None
        assert sorted(c.id for c in guild.text_channels) == sorted(pointed.text_channel_ids)
        assert pointed.identifies[0]["token"] == "fake-token"
        assert pointed.identifies[0]["intents"] & discord.Intents.message_content.flag
        login = pointed.find("GET", "/users/@me")[0]
        assert login.headers["Authorization"] == "Bot fake-token"
    finally:
        await client.close()
        await task


async def test_message_event_and_reply_are_recorded(pointed: FakeDiscord) -> None:
    client = EchoClient()
    task = await _run(client)
    try:
        alice = pointed.add_user("alice")
        channel_id = pointed.text_channel_ids[1]
        await pointed.dispatch_message(channel_id, alice, "not for you")
        sent = await pointed.dispatch_message(
            channel_id, alice, "olleh", mentions=[pointed.bot_user]
        )
        path = f"/channels/{channel_id}/messages"
        request = await pointed.wait_for(lambda r: r.method == "POST" and r.path == path)
        assert request.json["content"] == "hello"
        assert [m.content for m in client.seen] == ["not for you", "olleh"]
        assert client.seen[1].id == int(sent["id"])
        assert client.seen[1].author.id == int(alice["id"])
        assert isinstance(client.seen[1].author, discord.Member)
        assert len(pointed.find("POST", path)) == 1
        assert pointed.channel_messages(channel_id)[-1]["content"] == "hello"
    finally:
        await client.close()
        await task


async def test_unknown_route_is_a_404(pointed: FakeDiscord) -> None:
    client = EchoClient()
    task = await _run(client)
    try:
        with pytest.raises(discord.NotFound):
            await client.http.request(Route("GET", "/nothing/here"))
        with pytest.raises(discord.NotFound):
            await client.fetch_channel(1)
    finally:
        await client.close()
        await task


async def test_slash_command_interaction_round_trip(pointed: FakeDiscord) -> None:
    client = EchoClient()
    tree = discord.app_commands.CommandTree(client)
    group = discord.app_commands.Group(name="settings", description="settings")

    @group.command(name="set", description="set a value")
    async def set_value(interaction: discord.Interaction, key: str, value: str) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send(f"{key}={value}")
        await interaction.edit_original_response(content=f"{key} is now {value}")

    tree.add_command(group, guild=discord.Object(pointed.guild_id))
    task = await _run(client)
    try:
        synced = await tree.sync(guild=discord.Object(pointed.guild_id))
        assert [c.name for c in synced] == ["settings"]
        bob = pointed.add_user("bob")
        options = [
            {"type": 1, "name": "set", "options": [
                {"type": 3, "name": "key", "value": "temperature"},
                {"type": 3, "name": "value", "value": "0.5"},
            ]},
        ]  # fmt: skip
        channel_id = pointed.text_channel_ids[0]
        interaction = await pointed.dispatch_interaction(channel_id, bob, "settings", options)
        hook = f"/webhooks/{pointed.app_id}/{interaction['token']}"
        callback = await pointed.wait_for(lambda r: r.path.endswith("/callback"))
        assert callback.json["type"] == 5
        follow = await pointed.wait_for(lambda r: r.method == "POST" and r.path == hook)
        assert follow.json["content"] == "temperature=0.5"
        edit = await pointed.wait_for(lambda r: r.method == "PATCH" and r.path.startswith(hook))
        assert edit.json["content"] == "temperature is now 0.5"
        contents = [m["content"] for m in pointed.channel_messages(channel_id)]
        assert contents == ["temperature=0.5", "temperature is now 0.5"]
    finally:
        await client.close()
        await task


async def test_pings_follow_allowed_mentions(pointed: FakeDiscord) -> None:
    client = EchoClient()
    task = await _run(client)
    try:
        alice = pointed.add_user("alice")
        channel = client.get_channel(pointed.text_channel_ids[0])
        assert isinstance(channel, discord.TextChannel)
        quiet = await channel.send(
            f"@everyone <@{alice['id']}>", allowed_mentions=discord.AllowedMentions.none()
        )
        assert pointed.pings == []
        assert not quiet.mention_everyone
        loud = await channel.send(f"@everyone and <@{alice['id']}>")
        assert pointed.pings == [(str(loud.id), "@everyone"), (str(loud.id), f"<@{alice['id']}>")]
        assert loud.mention_everyone
        await quiet.edit(content="@here", allowed_mentions=discord.AllowedMentions(everyone=True))
        assert pointed.pings[-1] == (str(quiet.id), "@here")
    finally:
        await client.close()
        await task


async def test_threads_follow_discord(pointed: FakeDiscord) -> None:
    """Threads as discord.py sees them: THREAD_CREATE (a user's and the bot's, from a message),
    messages inside, THREAD_UPDATE archiving and locking, and refusals in closed threads."""
    client = EchoClient()
    task = await _run(client)
    try:
        alice = pointed.add_user("alice")
        parent = pointed.text_channel_ids[0]
        thread_id = await pointed.add_thread(parent, "talk", owner=alice)
        thread = await pointed.wait_until(lambda: client.get_channel(thread_id))
        assert isinstance(thread, discord.Thread) and thread.parent_id == parent
        await pointed.dispatch_message(thread_id, alice, "olleh", mentions=[pointed.bot_user])
        echo = await pointed.wait_for(lambda r: r.path == f"/channels/{thread_id}/messages")
        assert echo.json["content"] == "hello"
        assert isinstance(client.seen[-1].channel, discord.Thread)

        started = await pointed.dispatch_message(parent, alice, "start here")
        message = await client.get_channel(parent).fetch_message(int(started["id"]))  # type: ignore[union-attr]
        made = await message.create_thread(name="from a message")
        assert made.id == message.id and made.parent_id == parent
        assert pointed.thread_ids(parent) == [thread_id, made.id]
        assert await pointed.wait_until(lambda: client.get_channel(made.id))

        await pointed.set_thread_state(thread_id, locked=True)
        await pointed.wait_until(lambda: thread.locked)
        with pytest.raises(discord.Forbidden):
            await thread.send("nope")
        await pointed.set_thread_state(thread_id, locked=False, archived=True)
        await pointed.wait_until(lambda: thread.archived)
        with pytest.raises(discord.HTTPException) as refused:
            await thread.send("nope")
        assert refused.value.code == 50083
    finally:
        await client.close()
        await task


async def test_attachments_are_served(pointed: FakeDiscord) -> None:
    client = EchoClient()
    task = await _run(client)
    try:
        alice = pointed.add_user("alice")
        channel = pointed.text_channel_ids[0]
        file = pointed.attachment("notes.txt", b"some notes", "text/plain")
        await pointed.dispatch_message(channel, alice, "see file", attachments=[file])
        seen = await pointed.wait_until(lambda: client.seen)
        (attachment,) = seen[0].attachments
        assert (attachment.filename, attachment.size) == ("notes.txt", 10)
        assert await attachment.read() == b"some notes"
        assert pointed.downloads == [attachment.id]
    finally:
        await client.close()
        await task


async def test_button_interaction_round_trip(pointed: FakeDiscord) -> None:
    """A message with a button; pressing it sends a MESSAGE_COMPONENT interaction whose update
    response edits the message."""

    class Press(discord.ui.View):
        def __init__(self) -> None:
            super().__init__(timeout=None)

        @discord.ui.button(label="press", custom_id="test:press")
        async def press(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
            await interaction.response.edit_message(content="pressed", view=None)

    client = EchoClient()
    task = await _run(client)
    try:
        client.add_view(Press())
        channel = client.get_channel(pointed.text_channel_ids[0])
        sent = await channel.send("press me", view=Press())  # type: ignore[union-attr]
        shown = pointed.messages[sent.id]
        assert shown["components"][0]["components"][0]["custom_id"] == "test:press"
        await pointed.dispatch_component(shown, pointed.add_user("bob"), "test:press")
        await pointed.wait_until(lambda: pointed.messages[sent.id]["content"] == "pressed")
        assert pointed.messages[sent.id]["components"] == []
    finally:
        await client.close()
        await task
