"""Data producers (llm-d's request-control DataProducers): plugins outside the scheduling profiles that
put what they know about a request on it before the filters and scorers run, and keep their own
books after the pick (token-producer, session-id-producer, inflight-load-producer). The prefix
producers live with the prefix scorers that read them (pickers/plugins/scorer)."""
