"""Alembic environment and revisions of the bot's database, packaged so a wheel carries them."""
