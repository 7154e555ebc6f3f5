"""Helpers shared across test folders (imported as tests.helpers.X)."""
