"""GroupNorm's bench: its torch.compile baseline runs backward over a retained graph, which
AOTAutograd's donated buffers forbid; the bench turns them off for those timings only."""

from __future__ import annotations

import torch._functorch.config as functorch_config

from genext.bench import Config, measure
from genext.bench.group_norm_silu import BENCH, GNCase, make_case, retained_graph_compile


def test_compiled_backward_over_a_retained_graph_leaves_donated_buffers_alone():
    before = functorch_config.donated_buffer
    # a shape no other test compiles, so this compiles afresh; f+b first compiles the backward
    # for use once, the harder order for the retained-graph backward that follows
    case = make_case(GNCase((1, 24, 5, 7), groups=6), Config("cpu", quick=True, compile=True))
    timings = {(t.impl, t.direction): t for t in case.timings}
    assert timings["compile", "bwd"].context is retained_graph_compile
    rows = [
        measure(BENCH, case, timings["compile", d], None, "cpu", 1e9) for d in ("f+b", "bwd", "fwd")
    ]
    assert all(r is not None and r.ms > 0 for r in rows)
    assert functorch_config.donated_buffer == before
    with retained_graph_compile():
        assert functorch_config.donated_buffer is False
    assert functorch_config.donated_buffer == before


def test_other_timings_run_without_it():
    case = make_case(GNCase((1, 8, 3, 3), groups=2), Config("cpu", quick=True, compile=False))
    assert {t.impl for t in case.timings} == {"genext", "eager"}
    assert all(t.context is not retained_graph_compile for t in case.timings)
