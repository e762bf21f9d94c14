"""Fixtures shared by the unit tests' learner-loss modules (defined in tests/learner_fixture.py)."""

from learner_fixture import text_samples, vl  # noqa: F401
