"""User-facing pipelines composed from the stages in ``visinstruct.transforms``."""
