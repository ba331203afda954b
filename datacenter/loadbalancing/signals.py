"""Signals other parts (agent push, dashboard) subscribe to; sent after the transaction commits."""

from django.dispatch import Signal

# kwargs: generation (loadbalancing.models.Generation). Sent on commit of every new generation.
generation_created = Signal()
