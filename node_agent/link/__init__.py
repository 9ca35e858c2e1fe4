"""The agent's link to the operator: EdgeNode spec in, EdgeNode status and a Lease out."""
