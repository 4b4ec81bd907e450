"""Fine-tuning from Discord or the CLI: a server's dialogues -> training -> a new version."""
