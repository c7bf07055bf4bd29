"""Placeholder."""


class GenerationService:
    pass
