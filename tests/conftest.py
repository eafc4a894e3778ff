"""Shared test set-up: offline, quiet, deterministic."""

import os

# Set before anything imports transformers or albumentations: no hub, no update checks.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
