"""llm-d's predicted-latency plugins on llm-epp's online latency model (pickers.latency): the
producer of per-candidate predictions, and the scorer, filter and admitter that read them."""
