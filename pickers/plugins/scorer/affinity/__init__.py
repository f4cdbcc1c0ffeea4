"""Affinity scorers: prefer endpoints that hold the request's prompt, its session, its adapter or a label it asks for."""
