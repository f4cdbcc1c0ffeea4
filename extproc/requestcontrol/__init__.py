"""Request control: the director between the protocol and the scheduler (admission, saturation,
objectives and priority, model rewrites, tracing of routed requests)."""
