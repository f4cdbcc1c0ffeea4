"""Talking to the Kubernetes API: client configuration, the typed objects we read, list+watch, and
leader election on a Lease. Transport, auth and TLS are the `kubernetes_asyncio` client's; what comes
back is decoded once, at the edge, into the structs of `extproc.k8s.objects`.
"""
