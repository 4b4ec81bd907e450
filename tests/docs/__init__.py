"""Tests that the README, the tour script and .env.example say what the code does."""
