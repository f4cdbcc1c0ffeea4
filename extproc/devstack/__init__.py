"""The local development stack behind `epp up`: real Envoy + the EPP + simulated or real vLLM servers
on loopback, the process launcher and the Envoy config generation."""
