"""Signals other parts (agent push, dashboard) subscribe to."""

from django.dispatch import Signal

# kwargs: generation (loadbalancing.models.Generation). Sent on commit of every new generation.
generation_created = Signal()

# kwargs: generation. Sent inside the transaction that writes it, after the write: a receiver's
# own writes commit or roll back with the generation (the agent push stages its document here).
generation_staged = Signal()
