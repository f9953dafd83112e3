"""Taxonomy helpers shared by the converter, the store and the benchmark."""

from __future__ import annotations

import re

LEVELS = ("species", "genus", "family")
RANKS = ("class", "order", "family", "genus", "scientific_name")
BENCH_CLASSES = ("Aves", "Amphibia", "Mammalia", "Insecta")


def species_key(accepted_name: str | None, scientific_name: str | None) -> str:
    """First two words of the accepted (else scientific) name, lower-cased (the release's key)."""
    name = (accepted_name or "").strip() or (scientific_name or "").strip()
    return " ".join(name.split()[:2]).lower()


def folder_name(key: str) -> str:
    """The release's per-species image folder name for a species key."""
    s = key.lower()
    s = re.sub(r"\s+", "_", s)
    s = re.sub(r"[^a-z0-9 _-]", "_", s)
    s = re.sub(r"_+", "_", s).strip("_")
    return s[:120]
