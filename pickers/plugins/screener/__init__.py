"""Screeners: before every profile of a request, the candidates it may use at all (llm-d's requestcontrol.Screener)."""
