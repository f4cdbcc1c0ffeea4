"""ext_proc handlers: the life of one request (the RequestStream state machine), body parsing, token
usage from responses and the model-name restore. No gRPC and no network here."""
