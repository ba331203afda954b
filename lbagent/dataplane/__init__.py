"""Data-plane drivers: the kernel (nftables + NFQUEUE slow path) and the simulator.

A driver never decides where a packet goes; it asks `lbagent.core.decide`.
"""
