"""Text prompts of the BioVITA method (and BioCLIP 2's formats, which the frozen text tower knows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

TEMPLATES = ("com", "sci", "tax", "sci_com", "tax_com")
# A base model that must also know the higher ranks (the embedded run's stage 0, as BioCLIP
# mixes taxonomic levels): the species templates plus the bare genus and family names.
LEVEL_TEMPLATES = TEMPLATES + ("genus", "family")


@dataclass(frozen=True)
class Taxon:
    klass: str
    order: str
    family: str
    genus: str
    scientific_name: str
    common_name: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> "Taxon":
        return cls(
            klass=str(row["class"]),
            order=str(row["order"]),
            family=str(row["family"]),
            genus=str(row["genus"]),
            scientific_name=str(row["scientific_name"]),
            common_name=str(row.get("common_name") or ""),
        )

    @property
    def taxonomic(self) -> str:
        """`{tax}`: "class order family genus scientific_name"."""
        return " ".join(
            p for p in (self.klass, self.order, self.family, self.genus, self.scientific_name) if p
        )

    def prompt(self, template: str) -> str:
        com = self.common_name or self.scientific_name  # a taxon without a common name
        if template == "com":
            return com
        if template == "sci":
            return self.scientific_name
        if template == "tax":
            return self.taxonomic
        if template == "sci_com":
            return f"{self.scientific_name} with common name {com}"
        if template == "tax_com":
            return f"{self.taxonomic} with common name {com}"
        if template in ("genus", "family"):
            return getattr(self, template)
        raise ValueError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")

    def prompts(self, templates: tuple[str, ...] = TEMPLATES) -> list[str]:
        """Every prompt `random_prompt` can draw for this taxon."""
        return [self.prompt(t) for t in templates]

    def random_prompt(self, rng: np.random.Generator, templates: tuple[str, ...] = TEMPLATES) -> str:
        """One template drawn per training sample (from the caller's generator)."""
        return self.prompt(templates[int(rng.integers(len(templates)))])

    def name(self, level: str) -> str:
        """The bare name the benchmark embeds at a level (species, genus, family, common)."""
        return {
            "species": self.scientific_name,
            "genus": self.genus,
            "family": self.family,
            "common": self.common_name,
        }[level]
