"""Conversation storage: typed ORM models, the async Database, repositories, Alembic migrations.

Start-up: `db = await Database.open(settings.database_url)` migrates to head and marks replies a
crash left in progress as interrupted; then one unit of work per event:
`async with db.session() as s, s.begin(): ...`.
"""
