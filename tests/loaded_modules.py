"""Run in the isolated timing helper by tests (`run_isolated(loaded, name)`): imports nothing itself, so what it
reports is what the helper had imported for the calls before it."""


def loaded(name: str) -> bool:
    import sys

    return name in sys.modules
