"""Shared pytest fixtures. Session-scoped fixtures build small real data once (a mini MIMIC-CXR,
tiny models) so the suite stays fast."""

from __future__ import annotations
