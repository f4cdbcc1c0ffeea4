"""The scheduling framework: the plugin contracts, the scheduler, plugin parameters, the request and
endpoint types plugins read, and the errors they may raise. It imports nothing else of pickers."""
