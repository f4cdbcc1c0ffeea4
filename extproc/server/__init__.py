"""The EPP process and its composition root: the ext_proc gRPC server, gRPC health, the metrics and
admin HTTP servers, TLS. It wires the parts below; nothing below imports it."""
