"""The plugins, one folder per kind: filter, scorer, picker, profile (profile handlers and P/D deciders)."""
