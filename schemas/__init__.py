"""Typed records that flow between stages, sample keys, and the Arrow schema of every table we write.

The shard layout these records describe is documented in FORMAT.md at the repository root.
"""

from visinstruct.schemas.arrow import JsonDict, arrow_schema, from_row, from_table, to_row, to_table
from visinstruct.schemas.decision import Decision, Dropped
from visinstruct.schemas.keys import index_digits, key_for_row, make_key, parse_key, shard_name
from visinstruct.schemas.records import (
    IMAGE_TOKEN,
    SCHEMA_VERSION,
    Box,
    ClipScore,
    Curation,
    FetchedImage,
    GenerationInfo,
    ImageInfo,
    ImageRef,
    ImageTextPair,
    IndexRow,
    Member,
    Rejection,
    SampleMeta,
    ShardStats,
    Turn,
    conversation_problems,
    is_url,
    location_fields,
)

INDEX_SCHEMA = arrow_schema(IndexRow, SCHEMA_VERSION)  # NNNNN.parquet
REJECTED_SCHEMA = arrow_schema(Rejection, SCHEMA_VERSION)  # rejected/*.parquet
STATS_SCHEMA = arrow_schema(ShardStats, SCHEMA_VERSION)  # NNNNN_stats.json, as a table for `stats`

__all__ = [
    "IMAGE_TOKEN",
    "INDEX_SCHEMA",
    "REJECTED_SCHEMA",
    "SCHEMA_VERSION",
    "STATS_SCHEMA",
    "Box",
    "ClipScore",
    "Decision",
    "Dropped",
    "FetchedImage",
    "Curation",
    "GenerationInfo",
    "ImageInfo",
    "ImageRef",
    "ImageTextPair",
    "IndexRow",
    "JsonDict",
    "Member",
    "Rejection",
    "SampleMeta",
    "ShardStats",
    "Turn",
    "arrow_schema",
    "conversation_problems",
    "is_url",
    "location_fields",
    "from_row",
    "from_table",
    "index_digits",
    "key_for_row",
    "make_key",
    "parse_key",
    "shard_name",
    "to_row",
    "to_table",
]
