"""The shipped recipes (TOML), installed as the package data `flexslim.recipes`."""
