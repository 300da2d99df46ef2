"""Alembic environment, shipped as package data."""
