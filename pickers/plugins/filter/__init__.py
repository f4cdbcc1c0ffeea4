"""Filters: candidates in, the candidates that may serve out (order kept)."""
