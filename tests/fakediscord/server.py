"""An aiohttp fake of Discord (REST API and gateway), enough for an unpatched discord.py client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

API = "/api/v10"
HEARTBEAT_INTERVAL_MS = 41250
POLL_S = 0.05
EVERYONE_RE = re.compile(r"@(?:everyone|here)")
MENTION_RE = re.compile(r"<@([!&]?)(\d+)>")
ADMINISTRATOR = 1 << 3
EVERYONE_PERMISSIONS = 0x0000_0400_0000_0C00  # view channel, send messages, read history
PUBLIC_THREAD, PRIVATE_THREAD = 11, 12
THREAD_TYPES = (PUBLIC_THREAD, PRIVATE_THREAD)
GUILD_TYPES = (0, *THREAD_TYPES)  # channel types whose messages carry the guild id


@dataclass
class Recorded:
    """One REST request the fake received: method, path (no query), query and JSON body."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    headers: dict[str, str] = field(repr=False)
    at: float = field(default_factory=time.monotonic, repr=False)  # when it arrived


def _now() -> str:
    return datetime.now(UTC).isoformat()


class FakeDiscord:
    """A fake Discord on 127.0.0.1 (random port): a guild (more with add_guild), text channels,
    users and a bot user. Sharded clients get the guilds of their shard, (id >> 22) % count."""

    def __init__(self, n_channels: int = 3) -> None:
        self._ids = itertools.count(1_100_000_000_000_000_000)
        self.app_id = self.new_id()
        self.bot_user = self.make_user("fakebot", bot=True, user_id=self.app_id)
        self.owner = self.make_user("owner")
        self.guild_id = self.new_id()
        self.guild_names: dict[int, str] = {self.guild_id: "fake guild"}
        self.admin_role_id = self.new_id()
        self.roles: dict[int, dict[str, Any]] = {}  # more roles than @everyone and admin
        self.channels: dict[int, dict[str, Any]] = {}
        for i in range(n_channels):
            self.add_channel(f"general-{i}")
        self.users: dict[int, dict[str, Any]] = {}
        self.members: dict[int, dict[str, Any]] = {}
        self.channel_permissions: dict[tuple[int, int], int] = {}  # (channel, user): overwrite
        self.add_member(self.bot_user)
        self.add_member(self.owner)
        self.messages: dict[int, dict[str, Any]] = {}
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.requests: list[Recorded] = []
        self.pings: list[tuple[str, str]] = []  # (message id, who) each bot message notified
        self.identifies: list[dict[str, Any]] = []
        self._interaction_channels: dict[str, int] = {}  # interaction token -> channel id
        self._originals: dict[str, int] = {}  # interaction token -> original response message id
        self.files: dict[int, bytes] = {}  # attachment id -> the bytes its URL serves
        self.downloads: list[int] = []  # attachment ids fetched, in order
        self._pending_events: list[tuple[str, dict[str, Any]]] = []  # sent after the response
        self._changed = asyncio.Condition()
        self._sockets: list[_Session] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- identities ---------------------------------------------------------------------------

    def new_id(self) -> int:
        """A fresh snowflake."""
        return next(self._ids)

    def make_user(self, name: str, *, bot: bool = False, user_id: int | None = None) -> dict:
        """A user object (not yet a guild member)."""
        return {
            "id": str(user_id or self.new_id()),
            "username": name,
            "discriminator": "0",
            "global_name": name,
            "avatar": None,
            "bot": bot,
        }

    def add_member(self, user: dict[str, Any], admin: bool = False) -> dict[str, Any]:
        """Make `user` a member of the guild: @everyone permissions, plus the Administrator role
        if `admin`."""
        self.users[int(user["id"])] = user
        roles = [str(self.admin_role_id)] if admin else []
        member = {
            "user": user,
            "roles": roles,
            "joined_at": _now(),
            "deaf": False,
            "mute": False,
            "flags": 0,
        }
        self.members[int(user["id"])] = member
        return member

    def add_user(self, name: str, admin: bool = False) -> dict[str, Any]:
        """A new guild member (with the Administrator role if `admin`); returns its user object."""
        user = self.make_user(name)
        self.add_member(user, admin)
        return user

    def permissions(self, user: dict[str, Any]) -> int:
        """The member's guild permissions, from @everyone and its roles."""
        member = self.members[int(user["id"])]
        admin = str(self.admin_role_id) in member["roles"]
        return EVERYONE_PERMISSIONS | (ADMINISTRATOR if admin else 0) | self._role_permissions(user)

    def add_guild(self, name: str, guild_id: int) -> int:
        """Another guild with the same members (give it an id on the shard you want)."""
        self.guild_names[guild_id] = name
        return guild_id

    def add_channel(self, name: str, guild_id: int | None = None) -> int:
        """A new guild text channel (in the first guild by default); returns its id."""
        channel_id = self.new_id()
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(guild_id or self.guild_id),
            "name": name,
            "position": len(self.channels),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        return channel_id

    def add_dm(self, user: dict[str, Any]) -> int:
        """A DM channel between `user` and the bot; returns its id."""
        channel_id = self.new_id()
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": 1,
            "recipients": [user],
            "last_message_id": None,
        }
        return channel_id

    def thread(
        self,
        parent_id: int,
        name: str,
        *,
        thread_id: int | None = None,
        kind: int = PUBLIC_THREAD,
        owner_id: str | None = None,
    ) -> dict[str, Any]:
        """A new thread object under `parent_id` (not yet announced on the gateway)."""
        thread_id = thread_id or self.new_id()
        thread = {
            "id": str(thread_id),
            "type": kind,
            "guild_id": self.channels[parent_id].get("guild_id") or str(self.guild_id),
            "parent_id": str(parent_id),
            "name": name,
            "owner_id": owner_id or self.bot_user["id"],
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now(),
                "locked": False,
                "invitable": True,
            },
        }
        self.channels[thread_id] = thread
        return thread

    async def add_thread(
        self, parent_id: int, name: str, *, kind: int = PUBLIC_THREAD, owner: dict | None = None
    ) -> int:
        """A user starts a thread under `parent_id` (THREAD_CREATE); returns its id."""
        owner_id = (owner or self.owner)["id"]
        thread = self.thread(parent_id, name, kind=kind, owner_id=owner_id)
        await self.dispatch("THREAD_CREATE", dict(thread, newly_created=True))
        return int(thread["id"])

    async def set_thread_state(
        self, thread_id: int, *, archived: bool | None = None, locked: bool | None = None
    ) -> None:
        """Archive/unarchive or lock/unlock a thread (THREAD_UPDATE)."""
        meta = self.channels[thread_id]["thread_metadata"]
        if archived is not None:
            meta["archived"] = archived
            meta["archive_timestamp"] = _now()
        if locked is not None:
            meta["locked"] = locked
        await self.dispatch("THREAD_UPDATE", dict(self.channels[thread_id]))

    def thread_ids(self, parent_id: int) -> list[int]:
        """Ids of the threads under `parent_id`, in creation order."""
        return [
            cid
            for cid, ch in self.channels.items()
            if ch["type"] in THREAD_TYPES and ch.get("parent_id") == str(parent_id)
        ]

    def attachment(
        self, filename: str, data: bytes, content_type: str | None = None, size: int | None = None
    ) -> dict[str, Any]:
        """An attachment object whose URL (on this fake) serves `data`; `size` overrides the
        announced size (to test that the bot checks it before downloading)."""
        attachment_id = self.new_id()
        self.files[attachment_id] = data
        url = f"{self.base_url}/attachments/{attachment_id}/{filename}"
        found: dict[str, Any] = {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": url,
            "proxy_url": url,
        }
        if content_type is not None:
            found["content_type"] = content_type
        return found

    @property
    def text_channel_ids(self) -> list[int]:
        """Ids of the guild's text channels, in creation order."""
        return [cid for cid, ch in self.channels.items() if ch["type"] == 0]

    def application(self) -> dict[str, Any]:
        """The application object (GET /oauth2/applications/@me)."""
        return {
            "id": str(self.app_id),
            "name": "fakebot",
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner,
            "verify_key": "0" * 64,
            "flags": 1 << 19,  # GATEWAY_MESSAGE_CONTENT_LIMITED
            "team": None,
            "summary": "",
        }

    def guild(self, guild_id: int | None = None) -> dict[str, Any]:
        """The guild object sent in GUILD_CREATE: channels, members, @everyone and admin roles."""
        guild_id = guild_id or self.guild_id
        everyone = {
            "id": str(guild_id),
            "name": "@everyone",
            "permissions": str(EVERYONE_PERMISSIONS),
            "position": 0,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }
        admin = dict(everyone, id=str(self.admin_role_id), name="admin", position=1)
        admin["permissions"] = str(ADMINISTRATOR)
        return {
            "id": str(guild_id),
            "name": self.guild_names[guild_id],
            "icon": None,
            "owner_id": self.owner["id"],
            "roles": [everyone, admin, *self.roles.values()],
            "emojis": [],
            "stickers": [],
            "features": [],
            "member_count": len(self.members),
            "large": False,
            "unavailable": False,
            "channels": [
                ch
                for ch in self.channels.values()
                if ch["type"] == 0 and ch["guild_id"] == str(guild_id)
            ],
            "threads": [],
            "members": list(self.members.values()),
            "voice_states": [],
            "presences": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "joined_at": _now(),
        }

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT, known once started."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """What discord.py's `Route.BASE` / DISCORD_API_BASE should be."""
        return self.base_url + API

    @property
    def gateway_url(self) -> str:
        """The websocket URL that GET /gateway/bot returns."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{id}/{name}", self._download)
        app.router.add_route("*", API + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        """Close open gateway sessions and stop listening."""
        for session in list(self._sockets):
            await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- waiting ------------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, check: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until `check()` is truthy: re-checked after every request or gateway change, and
        every 50 ms for state outside the fake (the bot's own attributes)."""

        async def wait() -> Any:
            async with self._changed:
                while not (result := check()):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), POLL_S)
                return result

        return await asyncio.wait_for(wait(), timeout)

    async def wait_for(
        self, predicate: Callable[[Recorded], bool], timeout: float = 10.0
    ) -> Recorded:
        """The first recorded request matching `predicate`, waiting for it if needed."""
        return await self.wait_until(
            lambda: next((r for r in self.requests if predicate(r)), None), timeout
        )

    def find(self, method: str, path_part: str) -> list[Recorded]:
        """Recorded requests with this method whose path contains `path_part`."""
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def channel_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """Messages in a channel (sent by anyone), oldest first, as last edited."""
        return [m for m in self.messages.values() if m["channel_id"] == str(channel_id)]

    # ---- gateway ------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = _Session(ws)
        self._sockets.append(session)
        await session.send(10, {"heartbeat_interval": HEARTBEAT_INTERVAL_MS})
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                await self._on_gateway_message(session, json.loads(msg.data))
        finally:
            self._sockets.remove(session)
            await self._notify()
        return ws

    async def _on_gateway_message(self, session: _Session, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == 1:
            await session.send(11, None)
        elif op == 2:
            self.identifies.append(data)
            session.shard = tuple(data.get("shard") or (0, 1))
            guilds = [g for g in self.guild_names if session.serves(g)]
            ready = {
                "v": 10,
                "user": self.bot_user,
                "guilds": [{"id": str(g), "unavailable": True} for g in guilds],
                "session_id": f"session-{self.new_id()}",
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(self.app_id), "flags": self.application()["flags"]},
                "private_channels": [],
                "relationships": [],
            }
            if data.get("shard"):  # sharded clients (AutoShardedClient) read it back
                ready["shard"] = data["shard"]
            await session.dispatch("READY", ready)
            for guild_id in guilds:
                await session.dispatch("GUILD_CREATE", self.guild(guild_id))
            session.ready = True
            await self._notify()
        elif op == 6:  # RESUME: not supported, ask for a fresh IDENTIFY
            await session.send(9, False)
        elif op == 8:  # REQUEST_GUILD_MEMBERS
            chunk = {
                "guild_id": str(data.get("guild_id") or self.guild_id),
                "members": list(self.members.values()),
                "chunk_index": 0,
                "chunk_count": 1,
                "nonce": data.get("nonce"),
            }
            await session.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    @property
    def connected(self) -> int:
        """How many identified gateway sessions are open."""
        return sum(1 for s in self._sockets if s.ready and not s.ws.closed)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH event to every identified gateway session of the event's guild's
        shard (DMs: shard 0; waits for one)."""
        guild = int(data["guild_id"]) if data.get("guild_id") else None

        def sessions() -> list[_Session]:
            return [
                s
                for s in self._sockets
                if s.ready
                and not s.ws.closed
                and (guild is None or s.serves(guild))
                and (guild is not None or s.shard[0] == 0)
            ]

        await self.wait_until(sessions, timeout=10.0)
        for session in sessions():
            await session.dispatch(event, data)

    def _message(
        self, channel_id: int, author: dict[str, Any], content: str, **extra: Any
    ) -> dict[str, Any]:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise KeyError(f"unknown channel {channel_id}")
        message = {
            "id": str(self.new_id()),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if channel["type"] in GUILD_TYPES:
            message["guild_id"] = channel.get("guild_id") or str(self.guild_id)
        message.update(extra)
        if author is self.bot_user:
            self._record_pings(message)
        self.messages[int(message["id"])] = message
        channel["last_message_id"] = message["id"]
        return message

    async def dispatch_message(
        self,
        channel_id: int,
        author: dict[str, Any],
        content: str,
        mentions: list[dict[str, Any]] | None = None,
        reply_to: dict[str, Any] | None = None,
        attachments: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A user posts `content` (MESSAGE_CREATE) with optional `attachments` (made with
        `attachment()`); returns the message object."""
        extra: dict[str, Any] = {"mentions": list(mentions or [])}
        if attachments:
            extra["attachments"] = list(attachments)
        if reply_to is not None:
            extra["type"] = 19
            extra["message_reference"] = {
                "message_id": reply_to["id"],
                "channel_id": reply_to["channel_id"],
                "guild_id": reply_to.get("guild_id"),
            }
            extra["referenced_message"] = self.messages.get(int(reply_to["id"]), reply_to)
        message = self._message(channel_id, author, content, **extra)
        event = dict(message)
        member = self.members.get(int(author["id"]))
        if "guild_id" in message and member is not None:
            event["member"] = {k: v for k, v in member.items() if k != "user"}
        await self.dispatch("MESSAGE_CREATE", event)
        return message

    async def dispatch_interaction(
        self,
        channel_id: int,
        user: dict[str, Any],
        name: str,
        options: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A slash command (APPLICATION_COMMAND interaction); returns the interaction payload.

        `options` are Discord's nested options: a subcommand group or subcommand is
        {"type": 2 or 1, "name": ..., "options": [...]}, a value {"type": 3, "name", "value"}.
        """
        channel = self.channels[channel_id]
        guild_id = int(channel.get("guild_id") or self.guild_id)
        guild_cmds = self.commands.get(guild_id, [])
        command = next((c for c in guild_cmds if c["name"] == name), None)
        data: dict[str, Any] = {"name": name, "type": 1, "options": list(options or [])}
        data["resolved"] = self._resolved(options or [])
        if command is not None:
            data["guild_id"] = str(guild_id)
        else:
            command = next((c for c in self.commands.get(None, []) if c["name"] == name), None)
        data["id"] = command["id"] if command else str(self.new_id())
        interaction = self._interaction(2, channel_id, data)
        await self._send_interaction(interaction, channel, user)
        return interaction

    async def dispatch_component(
        self, message: dict[str, Any], user: dict[str, Any], custom_id: str
    ) -> dict[str, Any]:
        """A user presses the button `custom_id` under `message` (MESSAGE_COMPONENT
        interaction); returns the interaction payload."""
        channel_id = int(message["channel_id"])
        channel = self.channels[channel_id]
        data = {"custom_id": custom_id, "component_type": 2}
        interaction = self._interaction(3, channel_id, data)
        interaction["message"] = self.messages.get(int(message["id"]), message)
        self._originals[interaction["token"]] = int(message["id"])
        await self._send_interaction(interaction, channel, user)
        return interaction

    def _interaction(self, kind: int, channel_id: int, data: dict[str, Any]) -> dict[str, Any]:
        """An interaction payload of `kind` (2: slash command, 3: component) in a channel."""
        return {
            "id": str(self.new_id()),
            "application_id": str(self.app_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            "channel": self.channels[channel_id],
            "token": f"itoken-{self.new_id()}",
            "version": 1,
            "app_permissions": str(EVERYONE_PERMISSIONS),
            "locale": "en-US",
            "attachment_size_limit": 8 * 1024 * 1024,
            "entitlements": [],
        }

    async def _send_interaction(
        self, interaction: dict[str, Any], channel: dict[str, Any], user: dict[str, Any]
    ) -> None:
        """Add who acts (member in a guild, user in a DM) and dispatch INTERACTION_CREATE."""
        self._interaction_channels[interaction["token"]] = int(channel["id"])
        if channel["type"] in GUILD_TYPES:
            member = dict(self.members[int(user["id"])])
            overwrite = self.channel_permissions.get((int(channel["id"]), int(user["id"])), 0)
            member["permissions"] = str(self.permissions(user) | overwrite)
            interaction["guild_id"] = channel.get("guild_id") or str(self.guild_id)
            interaction["guild_locale"] = "en-US"
            interaction["member"] = member
        else:
            interaction["user"] = user
        await self.dispatch("INTERACTION_CREATE", interaction)

    # ---- REST ---------------------------------------------------------------------------------

    async def _download(self, request: web.Request) -> web.Response:
        """An attachment's bytes (what Discord's CDN serves at the attachment's URL)."""
        attachment_id = int(request.match_info["id"])
        data = self.files.get(attachment_id)
        if data is None:
            return web.Response(status=404)
        self.downloads.append(attachment_id)
        await self._notify()
        return web.Response(body=data, content_type="application/octet-stream")

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        path = request.path[len(API) :]
        self.requests.append(
            Recorded(request.method, path, dict(request.query), body, dict(request.headers))
        )
        try:
            response = self._route(request.method, path.strip("/").split("/"), body)
            events, self._pending_events = self._pending_events, []
            for event, data in events:
                await self.dispatch(event, data)
        finally:
            await self._notify()
        if response is None:
            return web.Response(status=204)
        if isinstance(response, web.Response):
            return response
        return _json(response)

    def _route(self, method: str, parts: list[str], body: Any) -> Any:
        match (method, parts):
            case ("GET", ["users", "@me"]):
                return self.bot_user
            case ("GET", ["gateway", "bot"]):
                limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
                return {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}
            case ("GET", ["gateway"]):
                return {"url": self.gateway_url}
            case ("GET", ["oauth2", "applications", "@me"]) | ("GET", ["applications", "@me"]):
                return self.application()
            case ("PUT", ["applications", _, "commands"]):
                return self._sync_commands(None, body)
            case ("PUT", ["applications", _, "guilds", guild_id, "commands"]):
                return self._sync_commands(int(guild_id), body)
            case ("GET", ["applications", _, "commands"]):
                return self.commands.get(None, [])
            case ("GET", ["applications", _, "guilds", guild_id, "commands"]):
                return self.commands.get(int(guild_id), [])
            case ("GET", ["channels", channel_id]):
                return self.channels.get(int(channel_id)) or _not_found()
            case ("POST", ["users", "@me", "channels"]):
                user = self.users.get(int(body["recipient_id"])) or self.make_user("someone")
                return self.channels[self.add_dm(user)]
            case ("POST", ["channels", channel_id, "typing"]):
                return None
            case ("POST", ["channels", channel_id, "messages"]):
                return self._closed(int(channel_id)) or self._message(
                    int(channel_id), self.bot_user, **_message_fields(body)
                )
            case ("GET", ["channels", _, "messages", message_id]):
                return self.messages.get(int(message_id)) or _not_found()
            case ("PATCH", ["channels", channel_id, "messages", message_id]):
                return self._closed(int(channel_id)) or self._edit(int(message_id), body)
            case ("DELETE", ["channels", _, "messages", message_id]):
                return None if self.messages.pop(int(message_id), None) else _not_found()
            case ("POST", ["channels", channel_id, "messages", message_id, "threads"]):
                return self._start_thread(int(channel_id), body, int(message_id))
            case ("POST", ["channels", channel_id, "threads"]):
                return self._start_thread(int(channel_id), body)
            case ("POST", ["interactions", interaction_id, token, "callback"]):
                if token not in self._interaction_channels:
                    return _json({"message": "Unknown interaction", "code": 10062}, 404)
                return self._callback(interaction_id, token, body)
            case ("POST", ["webhooks", _, token]):
                channel_id = self._interaction_channels.get(token)
                if channel_id is None:
                    return _not_found()
                return self._message(channel_id, self.bot_user, **_message_fields(body))
            case ("GET", ["webhooks", _, token, "messages", "@original"]):
                return self.messages.get(self._originals.get(token, 0)) or _not_found()
            case ("PATCH", ["webhooks", _, token, "messages", "@original"]):
                original = self._originals.get(token)
                if original is None:  # deferred: the edit creates the visible message
                    message = self._message(
                        self._interaction_channels[token], self.bot_user, content=""
                    )
                    original = self._originals[token] = int(message["id"])
                return self._edit(original, body)
            case ("PATCH", ["webhooks", _, _, "messages", message_id]):
                return self._edit(int(message_id), body)
            case ("DELETE", ["webhooks", _, _, "messages", message_id]):
                return self._delete(int(message_id))
        return _json({"message": "404: Not Found (fake)", "code": 0}, status=404)

    def _closed(self, channel_id: int) -> web.Response | None:
        """Discord's refusal of a bot message in an archived or locked thread, else None."""
        meta = self.channels.get(channel_id, {}).get("thread_metadata")
        if meta and meta["locked"]:
            return _json({"message": "Thread is locked", "code": 160005}, 403)
        if meta and meta["archived"]:
            return _json({"message": "Thread is archived", "code": 50083}, 400)
        return None

    def _start_thread(
        self, parent_id: int, body: dict[str, Any], message_id: int | None = None
    ) -> Any:
        """The bot starts a thread (from a message: the thread takes the message's id)."""
        parent = self.channels.get(parent_id)
        if parent is None or parent["type"] != 0:
            return _json({"message": "Cannot start a thread here (fake)", "code": 50024}, 400)
        if message_id is not None:
            message = self.messages.get(message_id)
            if message is None:
                return _not_found()
            if int(message["id"]) in self.channels:
                return _json({"message": "A thread has already been created", "code": 160004}, 400)
        kind = PUBLIC_THREAD if message_id is not None else int(body.get("type", PRIVATE_THREAD))
        thread = self.thread(parent_id, str(body["name"])[:100], thread_id=message_id, kind=kind)
        thread["thread_metadata"]["auto_archive_duration"] = body.get("auto_archive_duration", 1440)
        if message_id is not None:
            self.messages[message_id]["thread"] = thread
        self._pending_events.append(("THREAD_CREATE", dict(thread, newly_created=True)))
        return thread

    def _record_pings(self, message: dict[str, Any]) -> None:
        """Who Discord would notify for a bot message, given its allowed_mentions (absent: the
        defaults, which parse @everyone/@here, user and role mentions, and ping a replied user)."""
        allowed = message.get("allowed_mentions")
        parse = set(allowed.get("parse", [])) if allowed else {"everyone", "users", "roles"}
        content = message.get("content") or ""
        found: list[str] = []
        if "everyone" in parse:
            found += EVERYONE_RE.findall(content)
        for kind, snowflake in MENTION_RE.findall(content):
            key, listed = ("roles", "roles") if kind == "&" else ("users", "users")
            if key in parse or snowflake in (allowed or {}).get(listed, []):
                found.append(f"<@{kind}{snowflake}>")
        reference = message.get("message_reference")
        if reference and (allowed is None or allowed.get("replied_user", False)):
            replied = self.messages.get(int(reference["message_id"]))
            if replied is not None:
                found.append(f"<@{replied['author']['id']}>")
        message["mention_everyone"] = any(p.startswith("@") for p in found)
        self.pings += [(message["id"], who) for who in found]

    def _sync_commands(self, guild_id: int | None, body: list[dict[str, Any]]) -> list[dict]:
        synced = []
        for command in body:
            entry = {"type": 1, "default_member_permissions": None, "dm_permission": True}
            entry.update(command)
            entry.update(id=str(self.new_id()), application_id=str(self.app_id), version="1")
            if guild_id is not None:
                entry["guild_id"] = str(guild_id)
            synced.append(entry)
        self.commands[guild_id] = synced
        return synced

    def _edit(self, message_id: int, body: dict[str, Any]) -> Any:
        message = self.messages.get(message_id)
        if message is None:
            return _not_found()
        message.update(_message_fields(body, partial=True))
        message["edited_timestamp"] = _now()
        self._record_pings(message)
        return message

    def _delete(self, message_id: int) -> Any:
        if self.messages.pop(message_id, None) is None:
            return _not_found()
        return None

    def _callback(self, interaction_id: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        """Answer an interaction callback; type 4 creates the original response message."""
        channel_id = self._interaction_channels[token]
        kind = body.get("type")
        data = body.get("data") or {}
        result: dict[str, Any] = {
            "interaction": {
                "id": interaction_id,
                "type": 2,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(data.get("flags", 0) & 64),
            }
        }
        if kind == 7 and token in self._originals:  # UPDATE_MESSAGE: a component's message
            message = self._edit(self._originals[token], data)
            result["resource"] = {"type": 7, "message": message}
        elif kind == 4:
            message = self._message(channel_id, self.bot_user, **_message_fields(data))
            self._originals[token] = int(message["id"])
            result["interaction"]["response_message_id"] = message["id"]
            result["resource"] = {"type": 4, "message": message}
        else:
            result["resource"] = {"type": kind}
        return result

    # ---- roles, resolved options, component interactions ----------------------------------------

    def add_role(self, name: str, permissions: int = 0) -> int:
        """A new guild role (add it before the bot connects: it arrives in GUILD_CREATE)."""
        role_id = self.new_id()
        self.roles[role_id] = {
            "id": str(role_id),
            "name": name,
            "permissions": str(permissions),
            "position": len(self.roles) + 2,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }
        return role_id

    def allow_in_channel(self, user: dict[str, Any], channel_id: int, permissions: int) -> None:
        """A member overwrite of one channel: `permissions` there only (Discord resolves them
        into the member's permissions of interactions in that channel, not into their roles)."""
        self.channel_permissions[(channel_id, int(user["id"]))] = permissions

    def give_role(self, user: dict[str, Any], role_id: int) -> None:
        """Give a member a role (seen in the member data of their next messages)."""
        self.members[int(user["id"])]["roles"].append(str(role_id))

    def _role_permissions(self, user: dict[str, Any]) -> int:
        permissions = 0
        for role_id in self.members[int(user["id"])]["roles"]:
            role = self.roles.get(int(role_id))
            permissions |= int(role["permissions"]) if role else 0
        return permissions

    def _resolved(self, options: list[dict[str, Any]]) -> dict[str, Any]:
        """Discord's `resolved` data for user (6), channel (7) and role (8) options, nested
        subcommand options included."""
        resolved: dict[str, dict[str, Any]] = {}
        stack = list(options)
        while stack:
            option = stack.pop()
            stack += option.get("options", [])
            kind, value = option.get("type"), str(option.get("value", ""))
            if kind == 6 and int(value) in self.users:
                resolved.setdefault("users", {})[value] = self.users[int(value)]
                member = self.members.get(int(value))
                if member is not None:
                    entry = {k: v for k, v in member.items() if k != "user"}
                    resolved.setdefault("members", {})[value] = entry
            elif kind == 7 and int(value) in self.channels:
                channel = dict(self.channels[int(value)], permissions=str(EVERYONE_PERMISSIONS))
                resolved.setdefault("channels", {})[value] = channel
            elif kind == 8 and int(value) in self.roles:
                resolved.setdefault("roles", {})[value] = self.roles[int(value)]
        return resolved


def button_ids(message: dict[str, Any]) -> list[str]:
    """The custom ids of a message's buttons, in order."""
    rows = message.get("components") or []
    return [c["custom_id"] for row in rows for c in row.get("components", []) if "custom_id" in c]


def _message_fields(body: dict[str, Any] | None, partial: bool = False) -> dict[str, Any]:
    """The message fields a create/edit body sets (content, embeds, flags, allowed_mentions...)."""
    body = body or {}
    keys = ("content", "embeds", "flags", "components", "allowed_mentions", "message_reference")
    fields = {k: body[k] for k in keys if k in body}
    if not partial:
        fields.setdefault("content", "")
    return fields


def _json(data: Any, status: int = 200) -> web.Response:
    """A JSON response whose Content-Type is exactly `application/json`, as discord.py expects."""
    body = json.dumps(data).encode()
    return web.Response(body=body, status=status, headers={"Content-Type": "application/json"})


def _not_found() -> web.Response:
    return _json({"message": "Unknown (fake)", "code": 10008}, status=404)


async def _read_body(request: web.Request) -> Any:
    """JSON body, or the `payload_json` part of a multipart body; None when empty."""
    if not request.can_read_body:
        return None
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        raw = form.get("payload_json")
        return json.loads(raw) if isinstance(raw, str) else None
    text = await request.text()
    return json.loads(text) if text else None


class _Session:
    """One gateway websocket with its own sequence numbers."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.seq = 0
        self.ready = False
        self.shard: tuple[int, int] = (0, 1)  # (id, count) from IDENTIFY

    def serves(self, guild_id: int) -> bool:
        """Discord's rule: a guild belongs to shard (guild_id >> 22) % shard count."""
        return (guild_id >> 22) % self.shard[1] == self.shard[0]

    async def send(self, op: int, data: Any) -> None:
        await self.ws.send_str(json.dumps({"op": op, "d": data, "s": None, "t": None}))

    async def dispatch(self, event: str, data: Any) -> None:
        self.seq += 1
        await self.ws.send_str(json.dumps({"op": 0, "d": data, "s": self.seq, "t": event}))
