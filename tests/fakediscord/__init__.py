"""A local fake Discord (REST + gateway) that the real discord.py client connects to in tests."""

from tests.fakediscord.server import FakeDiscord, Recorded

__all__ = ["FakeDiscord", "Recorded"]
