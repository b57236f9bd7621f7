"""nbgrader configuration for this course (see autograder/nbgrader_settings.py)."""
from pathlib import Path

from autograder.nbgrader_settings import configure

configure(get_config(), root=Path(__file__).parent)  # noqa: F821 - provided by nbgrader
