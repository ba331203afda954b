"""Dashboard views: thin functions over the apps' querysets, services and the tenancy scoping."""

from .audit import audit_log
from .inventory import host_detail, host_list, tenant_detail, tenant_list
from .lb import agent_list, backend_editor, backend_state, pool_detail, pool_list, vip_detail, vip_list
from .overview import overview
from .p2v import event_decide, event_list, job_detail, job_list, machine_detail, machine_list

__all__ = [
    "agent_list",
    "audit_log",
    "backend_editor",
    "backend_state",
    "event_decide",
    "event_list",
    "host_detail",
    "host_list",
    "job_detail",
    "job_list",
    "machine_detail",
    "machine_list",
    "overview",
    "pool_detail",
    "pool_list",
    "tenant_detail",
    "tenant_list",
    "vip_detail",
    "vip_list",
]
