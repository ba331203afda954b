"""The lab: network namespaces with a bird2 router, muxes, backend hosts and clients, used by the
integration tests and for demos (`lbagent lab up|down|status`)."""
