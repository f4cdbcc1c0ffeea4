"""Flow control's policy plugins (llm-d's): fairness between flows, ordering within a flow, usage
limits per band, saturation detectors, eviction, and agent-identity (the fairness id from agent
session headers). Pure: the runtime (extproc.flowcontrol) holds the queues and calls them; the
contracts are pickers.framework.flowcontrol."""
