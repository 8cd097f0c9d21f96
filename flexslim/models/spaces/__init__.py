"""The families' network builders."""
