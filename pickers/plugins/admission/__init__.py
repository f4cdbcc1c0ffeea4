"""Guardrail admission plugins (docs/guardrails.md): request limits per objective or model, and checks
of the prompt's content. Both are Admitters: they run once per request before flow control's queues
(before scheduling without them), in config order, and the first to refuse answers the client."""
