"""Load scorers: prefer endpoints with less work queued, running or in flight."""
