"""flexslim.recipe: what a user can ask for, and every check of it.

Modules: `schema` (the frozen dataclasses, loading, overrides, TOML writing), `rules` (one rule per recipe key and
the cross-field checks), `checks` (every number from flags, recipes and metadata; output paths), `choices` (the one
table of each named choice: families, search and bench methods, providers, datasets).

May import: errors only. Imported by everything above it.
"""
