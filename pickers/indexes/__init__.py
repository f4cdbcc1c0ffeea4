"""Indexes the cache-aware plugins read: the approximate prefix index, the precise KV-block index fed
by engines' KV events, request tokenization and vLLM's block hash."""
