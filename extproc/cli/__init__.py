"""`epp`, the command line: serve, up, sim, envoy-config, status. The parser and the commands are in
`extproc.cli.main`; `python -m extproc.cli` runs it."""
