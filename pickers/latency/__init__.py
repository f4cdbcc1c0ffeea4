"""The latency model: per-endpoint TTFT and TPOT predicted from the queue ahead and the running
batch, with rates fitted online from every response (model.py; the running fits in fit.py)."""
