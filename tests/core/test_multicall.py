"""A multicall inside a multicall (docs/xen.md section 20): do_multicall finds itself already
in a multicall and answers -EINVAL into that entry, whose own entries never run; the entries
around it run as usual."""

from hypervisor.core.abi import MmuextCmd


def test_a_nested_multicall_is_einval_in_its_entry_only_and_its_entries_never_run(hv, guest):
    _, mfn = guest.alloc()
    guest.make_readonly(guest.next_pfn - 1)
    pin = {"op": "mmuext_op", "args": {"ops": [[MmuextCmd.PIN_L1_TABLE, mfn, 0]]}}
    results = guest.call("multicall", calls=[
        {"op": "xen_version", "args": {}},
        {"op": "multicall", "args": {"calls": [pin]}},
        {"op": "xen_version", "args": {}},
    ])
    assert [sorted(r) for r in results] == [["result"], ["errno", "message"], ["result"]]
    assert results[1]["errno"] == "EINVAL" and "entry 1 is itself a multicall" in results[1]["message"]
    assert not hv.frame_info(mfn)["pinned"]  # the nested entry's own entries did not run
    assert hv.stats[("multicall", "ok")] == 1 and hv.stats[("multicall/multicall", "EINVAL")] == 1
