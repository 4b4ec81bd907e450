"""Tests of the bot core: config, storage, migrations, conversation logic, console chat."""
