"""The Parquet media store: three tables, each a folder of Parquet shards.

    ROOT/audio/part-*.parquet   one row per clip   (encoded bytes + taxonomy + split)
    ROOT/image/part-*.parquet   one row per image  (encoded bytes + taxonomy + split)
    ROOT/taxa/part-*.parquet    one row per species (taxonomy + 34 trait labels)
"""

from __future__ import annotations

import pyarrow as pa

TAXONOMY_COLUMNS = ("class", "order", "family", "genus", "scientific_name", "common_name")

TRAIT_GROUPS: dict[str, tuple[str, ...]] = {
    "diet": ("carnivore", "herbivore", "insectivore", "omnivore", "piscivore", "frugivore"),
    "activity": ("diurnal", "nocturnal", "crepuscular"),
    "locomotion": ("flying", "walking", "swimming", "climbing", "burrowing"),
    "lifestyle": ("arboreal", "terrestrial", "aquatic", "aerial"),
    "habitat": ("forest", "grassland", "wetland", "desert", "marine", "urban"),
    "climate": ("tropical", "temperate", "arid", "polar"),
    "social": ("solitary", "pair", "group"),
    "migration": ("migratory", "resident", "nomadic"),
}
TRAIT_COLUMNS = tuple(f"trait_{g}_{label}" for g, labels in TRAIT_GROUPS.items() for label in labels)
assert len(TRAIT_COLUMNS) == 34

SPLITS = ("train", "test")

_taxonomy_fields = [pa.field(c, pa.string()) for c in TAXONOMY_COLUMNS]

AUDIO_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("bytes", pa.binary()),
        pa.field("format", pa.string()),
        pa.field("source", pa.string()),
        pa.field("recording_id", pa.string()),
        *_taxonomy_fields,
        pa.field("species_id", pa.int32()),
        pa.field("split", pa.string()),
    ]
)

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("bytes", pa.binary()),
        pa.field("format", pa.string()),
        *_taxonomy_fields,
        pa.field("species_id", pa.int32()),
        pa.field("split", pa.string()),
    ]
)

TAXA_SCHEMA = pa.schema(
    [
        pa.field("species_id", pa.int32()),
        *_taxonomy_fields,
        pa.field("seen", pa.bool_()),
        *[pa.field(c, pa.int8()) for c in TRAIT_COLUMNS],
    ]
)

SCHEMAS = {"audio": AUDIO_SCHEMA, "image": IMAGE_SCHEMA, "taxa": TAXA_SCHEMA}
MEDIA_TABLES = ("audio", "image")
# Columns that are metadata only (what the driver may read without pulling media bytes).
META_COLUMNS = {t: [f.name for f in s if f.name != "bytes"] for t, s in SCHEMAS.items()}


def check_schema(table: str, schema: pa.Schema) -> list[str]:
    """Problems with a table's schema (empty when it matches the store format)."""
    want = SCHEMAS[table]
    problems = []
    for f in want:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            problems.append(f"{table}: missing column {f.name!r} ({f.type})")
        elif not schema.field(idx).type.equals(f.type) and not (
            pa.types.is_large_binary(schema.field(idx).type) and pa.types.is_binary(f.type)
        ) and not (pa.types.is_large_string(schema.field(idx).type) and pa.types.is_string(f.type)):
            problems.append(
                f"{table}: column {f.name!r} has type {schema.field(idx).type}, expected {f.type}"
            )
    return problems
