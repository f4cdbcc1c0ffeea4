"""Once started, the server's long-lived objects are out of the cyclic GC's generations (gc.freeze), so
a full collection under load does not walk them (bench/scale.py prints the pauses)."""

from __future__ import annotations

import gc

from extproc.server.runner import EppServer, ServeOptions


async def test_start_moves_what_start_up_made_to_the_permanent_generation():
    gc.unfreeze()
    server = EppServer(ServeOptions(strategy="default", admin_port=0, grpc_port=0, grpc_health_port=0, metrics_port=0))
    await server.start()
    try:
        assert gc.get_freeze_count() > 0
        frozen = gc.get_objects()  # what a full collection still walks: the young, not the frozen
        assert not any(o is server.datastore for o in frozen)
    finally:
        await server.stop()
        gc.unfreeze()
