"""Helpers shipped with the tests (typed, real components; no mocks of the engine)."""
