"""Request-control plugins that act on the response rather than on the pick (llm-d's
requestcontrol plugins): request-attribute-reporter, which reports a value computed from the
response's usage back to the gateway as dynamic metadata."""
