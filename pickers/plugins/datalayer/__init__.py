"""Data-layer plugins (llm-d's `dataLayer`): sources, extractors and discovery, validated and typed here,
run by the server's data layer (extproc.datalayer)."""
