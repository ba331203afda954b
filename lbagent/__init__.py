"""lbagent: the load-balancer agent. A pure core (hashing, tables, ownership, decisions) and the
drivers, peer protocol, BGP control and portal client around it. Never imports Django."""

__version__ = "0.1.0"
