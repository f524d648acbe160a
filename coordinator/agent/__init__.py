"""The agent: reads one node's sources of membership and reports them to the coordinator."""
