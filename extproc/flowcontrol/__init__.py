"""Flow control: the EPP's queues that hold requests while the pool is saturated (see controller.py)."""
