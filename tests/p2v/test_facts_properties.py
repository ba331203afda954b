"""Properties of the facts parsers beyond "no crash": generated tool output parses to exactly the
values that went into it, and a broken answer is refused with an error naming the command.

p2v/tests/test_facts.py fuzzes the parsers with arbitrary text and only checks that nothing but
FactsParseError escapes; a parser that returned wrong numbers (a kB/bytes slip, a swapped
column, a dropped row) would pass it. These build output the way the tools print it from drawn
values and compare the parse with those values.
"""

from __future__ import annotations

import json
import shlex
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2v import facts
from p2v.facts import FactsParseError

WORD = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
BYTES = st.integers(min_value=0, max_value=2**50)


@settings(max_examples=100, deadline=None)
@given(kb=st.integers(min_value=0, max_value=2**40), before=st.lists(st.sampled_from(
    ["MemFree:        1024 kB", "Buffers:           0 kB", "SwapTotal:  2048 kB"]), max_size=3))
def test_meminfo_is_memtotal_in_bytes(kb, before):
    text = "\n".join([*before, f"MemTotal:       {kb} kB", "MemAvailable:   7 kB"]) + "\n"
    assert facts.parse_meminfo(text) == kb * 1024


@settings(max_examples=100, deadline=None)
@given(vcpus=st.integers(1, 4096), sockets=st.integers(1, 8), cores=st.integers(1, 128),
       threads=st.integers(1, 4), model=WORD, nested=st.booleans())
def test_lscpu_reports_the_rows_it_was_given(vcpus, sockets, cores, threads, model, nested):
    topology = [{"field": "Socket(s):", "data": str(sockets)},
                {"field": "Core(s) per socket:", "data": str(cores)},
                {"field": "Thread(s) per core:", "data": str(threads)}]
    model_row = {"field": "Model name:", "data": model}
    if nested:  # lscpu >= 2.38 nests the topology under the model name
        model_row["children"] = topology
        rows = [{"field": "Architecture:", "data": "x86_64"}, {"field": "CPU(s):", "data": str(vcpus)},
                model_row]
    else:
        rows = [{"field": "Architecture:", "data": "x86_64"}, {"field": "CPU(s):", "data": str(vcpus)},
                model_row, *topology]
    assert facts.parse_lscpu(json.dumps({"lscpu": rows})) == {
        "vcpus": vcpus, "sockets": sockets, "cores_per_socket": cores, "threads_per_core": threads,
        "model": model, "architecture": "x86_64"}


DF_ROW = st.tuples(
    st.one_of(WORD.map(lambda w: "/dev/" + w.replace("/", "")),
              st.sampled_from(["tmpfs", "overlay", "proc"])),
    st.sampled_from(["ext4", "xfs", "vfat", "tmpfs"]), BYTES, BYTES, BYTES,
    st.text(alphabet="abc /_-", min_size=1, max_size=15).map(lambda t: "/" + t.strip()),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(DF_ROW, max_size=6))
def test_df_keeps_block_device_rows_with_their_numbers_and_spaced_mount_points(rows):
    lines = ["Filesystem     Type     1B-blocks        Used   Available Mounted on"]
    lines += [f"{src} {fs} {size} {used} {avail} {target}" for src, fs, size, used, avail, target in rows]
    expected = [
        {"device": src, "fstype": fs, "size_bytes": size, "used_bytes": used, "avail_bytes": avail,
         "mountpoint": target}
        for src, fs, size, used, avail, target in rows if src.startswith("/dev/")
    ]
    assert facts.parse_df("\n".join(lines) + "\n") == expected


@settings(max_examples=100, deadline=None)
@given(sysname=WORD, release=WORD, machine=WORD)
def test_uname_fields_in_order(sysname, release, machine):
    assert facts.parse_uname(f"{sysname} {release} {machine}\n") == {
        "sysname": sysname, "release": release, "machine": machine}


@settings(max_examples=100, deadline=None)
@given(os_id=WORD, name=st.text(alphabet=string.ascii_letters + string.digits + " .-_()/'\"$`\\", min_size=1,
                                max_size=30).filter(str.strip),
       version=st.one_of(st.none(), WORD), likes=st.lists(st.sampled_from(["debian", "rhel", "fedora"]),
                                                          max_size=2))
def test_os_release_unquotes_what_the_shell_would(os_id, name, version, likes):
    lines = ["# written by the distribution", f"ID={shlex.quote(os_id)}", f"NAME={shlex.quote(name)}"]
    if version is not None:
        lines.append(f"VERSION_ID={shlex.quote(version)}")
    if likes:
        lines.append(f"ID_LIKE={shlex.quote(' '.join(likes))}")
    parsed = facts.parse_os_release("\n".join(lines) + "\n")
    assert parsed == {"id": os_id, "name": name, "version_id": version, "pretty_name": None,
                      "id_like": likes or None}


@pytest.mark.parametrize(("parser", "text", "problem"), [
    (facts.parse_meminfo, "MemFree: 1 kB\n", "no MemTotal line"),
    (facts.parse_meminfo, "MemTotal: 12 MB\n", "MemTotal line is not '<n> kB'"),
    (facts.parse_lscpu, json.dumps({"lscpu": [{"field": "CPU(s):", "data": "0"}]}), "CPU(s) is 0"),
    (facts.parse_lscpu, json.dumps({"cpus": []}), "expected an object with an 'lscpu' list"),
    (facts.parse_df, "Source Type\n", "missing the 'Filesystem Type ...' header"),
    (facts.parse_df, "Filesystem Type\n/dev/sda1 ext4 10 5\n", "row does not have 6 columns"),
    (facts.parse_uname, "Linux 6.1.0\n", "expected '<sysname> <release> <machine>'"),
    (facts.parse_firmware, "coreboot\n", "expected 'bios' or 'uefi'"),
    (facts.parse_os_release, "PRETTY_NAME='x'\n", "neither ID nor NAME is set"),
    (facts.parse_os_release, "ID='debian\n", "unbalanced quotes"),
])
def test_a_broken_answer_is_refused_naming_the_command_and_the_problem(parser, text, problem):
    with pytest.raises(FactsParseError) as caught:
        parser(text)
    assert caught.value.command  # the command the admin can re-run
    assert str(caught.value).startswith(f"`{caught.value.command}`: ")
    assert problem in caught.value.problem
    assert text.strip().splitlines()[0][:20] in str(caught.value)  # the start of the output it got
