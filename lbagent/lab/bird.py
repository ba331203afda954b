"""bird2 configuration for the lab router: one eBGP session per mux, routes merged into ECMP."""

from __future__ import annotations

from collections.abc import Sequence

ROUTER_AS = 65000
MUX_AS = 65001


def render_bird_conf(router_id: str, mux_addresses: Sequence[str], log_path: str) -> str:
    """The router's bird.conf: import everything the muxes announce (IPv4 and IPv6 unicast over one
    IPv4 session per mux), install it as multipath routes."""
    sessions = "\n".join(
        f"protocol bgp mux{i} from muxes {{ neighbor {addr} as {MUX_AS}; }}"
        for i, addr in enumerate(mux_addresses, start=1)
    )
    # Short timers: a mux that dies silently must lose its routes in seconds, and a restarted one
    # must be able to reconnect at once (bird otherwise waits up to a minute after an error).
    return f"""log "{log_path}" all;
router id {router_id};
protocol device {{ scan time 5; }}
protocol kernel {{
  ipv4 {{ import none; export all; }};
  merge paths on;
  learn off;
}}
protocol kernel {{
  ipv6 {{ import none; export all; }};
  merge paths on;
  learn off;
}}
template bgp muxes {{
  local {router_id} as {ROUTER_AS};
  hold time 3;
  keepalive time 1;
  connect retry time 1;
  error wait time 1, 2;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};  # IPv6 VIPs over the same (IPv4) session: MP-BGP
}}
{sessions}
"""
