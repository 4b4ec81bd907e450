"""Entry points of `python -m bot start|run`: Discord with a token, else guidance or the console."""

from __future__ import annotations

import argparse
import sys

from bot import console
from bot.config import get_settings

PERMISSIONS = 274877975552  # View Channels, Send Messages, Send in Threads, Read History
NO_TOKEN_HELP = f"""\
No Discord token configured. To run the bot on Discord:
  1. Create an application at https://discord.com/developers/applications and add a Bot.
  2. On the Bot page, enable the "Message Content Intent" and copy the token.
  3. Set it: export DISCORD_TOKEN=... (or put DISCORD_TOKEN=... in .env).
  4. Invite the bot with the scopes `bot applications.commands`:
     https://discord.com/oauth2/authorize?client_id=APP_ID&scope=bot+applications.commands&permissions={PERMISSIONS}
Without a token, `python -m bot chat` chats in this terminal."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`run` takes its configuration from the environment, .env or BOT_CONFIG."""


def run_main(args: argparse.Namespace) -> int:
    """Connect to Discord; without a token print how to get one and exit 2."""
    settings = get_settings()
    if settings.discord_token is None or not settings.discord_token.get_secret_value():
        print(NO_TOKEN_HELP, file=sys.stderr)
        return 2
    print("error: the Discord client (bot.client.ChatBot) is not implemented yet", file=sys.stderr)
    return 1


def add_start_arguments(parser: argparse.ArgumentParser) -> None:
    """`start` accepts the console chat's options, used when no token is configured."""
    console.add_arguments(parser)


def start_main(args: argparse.Namespace) -> int:
    """Discord if a token is configured, else the console chat."""
    if get_settings().discord_token is not None:
        return run_main(args)
    return console.main(args)
