"""Talking to the Kubernetes API: client configuration, the typed objects we read, list+watch, leader
election on a Lease, pool discovery and the objective/rewrite watches. Transport, auth and TLS are the
`kubernetes_asyncio` client's; answers are decoded once, at the edge, into `extproc.kubernetes.objects`.
"""
