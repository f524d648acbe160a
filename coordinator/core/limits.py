"""Bounds on what memberguard keeps and quotes: one place, so that a record or a refusal stays small whatever a
caller or a failing agent said."""

from __future__ import annotations


def cut(text: str, limit: int) -> str:
    """text, or its first `limit` characters and how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"
