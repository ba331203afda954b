"""The LVM layout in the facts: parsed from `lvs`/`pvs` JSON reports as a Debian 12 server prints them."""

from __future__ import annotations

import pytest

from p2v import facts

# As the LVM + XFS real guest printed them (tests/realguest/variants_lvm.py, lvm2 2.03.16), with a
# striped volume added by hand.
LVS = """  {
      "report": [
          {
              "lv": [
                  {"lv_path":"/dev/vg0/root", "lv_dm_path":"/dev/mapper/vg0-root",
                   "vg_name":"vg0", "lv_name":"root", "segtype":"linear",
                   "seg_start":"0", "seg_size":"1610612736",
                   "seg_pe_ranges":"/dev/sda2:0-383", "vg_extent_size":"4194304"},
                  {"lv_path":"/dev/vg0/swap", "lv_dm_path":"/dev/mapper/vg0-swap",
                   "vg_name":"vg0", "lv_name":"swap", "segtype":"linear",
                   "seg_start":"0", "seg_size":"134217728",
                   "seg_pe_ranges":"/dev/sda2:384-415", "vg_extent_size":"4194304"},
                  {"lv_path":"/dev/vg0/data", "lv_dm_path":"/dev/mapper/vg0-data",
                   "vg_name":"vg0", "lv_name":"data", "segtype":"striped",
                   "seg_start":"0", "seg_size":"8388608",
                   "seg_pe_ranges":"/dev/sda2:416-416 /dev/sdb1:0-0", "vg_extent_size":"4194304"}
              ]
          }
      ]
  }
"""
PVS = """  {
      "report": [
          {
              "pv": [
                  {"pv_name":"/dev/sda2", "vg_name":"vg0", "pe_start":"1048576"}
              ]
          }
      ]
  }
"""


def test_lvs_and_pvs_reports_become_volumes_with_their_segments():
    layout = facts.parse_lvs(LVS, PVS)
    assert layout["physical_volumes"] == [{"device": "/dev/sda2", "vg": "vg0", "pe_start_bytes": 1048576}]
    root, swap, data = layout["logical_volumes"]
    assert (root["dm_path"], root["vg"], root["name"]) == ("/dev/mapper/vg0-root", "vg0", "root")
    assert root["segments"] == [
        {
            "type": "linear",
            "start_bytes": 0,
            "size_bytes": 1610612736,
            "extent_bytes": 4194304,
            "pv": "/dev/sda2",
            "first_pe": 0,
        }
    ]
    assert swap["segments"][0]["first_pe"] == 384
    assert data["segments"][0]["type"] == "striped"
    assert "pv" not in data["segments"][0]  # a striped segment is not one place on one PV


def test_an_lvs_report_of_another_shape_names_the_command():
    with pytest.raises(facts.FactsParseError, match="lvs --reportformat json"):
        facts.parse_lvs('{"report": [{"vg": []}]}', PVS)


def test_lvm_is_only_asked_when_the_machine_has_lvm(monkeypatch):
    asked = []

    def probe(tool, command):
        asked.append(command)
        return {facts.CMD_LVS: LVS, facts.CMD_PVS: PVS}[command]

    unknown: list[str] = []
    plain = [{"path": "/dev/sda", "partitions": [{"path": "/dev/sda1", "fstype": "ext4", "children": []}]}]
    assert facts._collect_lvm(probe, plain, unknown) is None
    assert asked == []
    with_pv = [
        {"path": "/dev/sda", "partitions": [{"path": "/dev/sda2", "fstype": "LVM2_member", "children": []}]}
    ]
    assert facts._collect_lvm(probe, with_pv, unknown)["logical_volumes"][0]["name"] == "root"
    assert asked == [facts.CMD_LVS, facts.CMD_PVS]
    assert unknown == []
