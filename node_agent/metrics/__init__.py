"""The agent's Prometheus metrics: the agent's own (`agent`) and text generation's
(`generation`), each declared once on a passed-in registry."""
