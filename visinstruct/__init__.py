"""visinstruct: build visual instruction-tuning datasets with Apache Beam.

The subpackages live in the repository's top-level folders (see ARCHITECTURE.md):
``visinstruct.schemas``, ``visinstruct.configs``, ``visinstruct.transforms``, ``visinstruct.pipelines``,
``visinstruct.cli``, ``visinstruct.trainer`` and ``visinstruct.testing``.
"""

__version__ = "0.1.0"
