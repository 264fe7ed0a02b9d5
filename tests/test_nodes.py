"""plsc.nodes: several nodes meet before any rank starts, or the run ends naming who is missing.

Every address is on the loopback range (127.0.0.0/8 is all this machine's): two nodes are two threads."""

from __future__ import annotations

import socket
import threading

import pytest

from plsc import nodes
from plsc.errors import PlscError

NODES = ["127.0.0.1", "127.0.0.2"]
OUTER_LIMIT_S = 60  # a guard against a hang, far above any wait asked for below


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_thread(function, *args) -> dict:
    """Run ``function(*args)`` in a thread; the dict gets its error (or None) once it returned."""
    result: dict = {}

    def target():
        try:
            function(*args)
            result["error"] = None
        except PlscError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    result["thread"] = thread
    return result


def finished(result: dict) -> str | None:
    result["thread"].join(OUTER_LIMIT_S)
    assert "error" in result, "still waiting long after its bound"
    return result["error"]


def test_all_nodes_there_meet_whichever_starts_first():
    for joiner_first in (False, True):
        port = free_port()
        order = [(1, NODES), (0, NODES)] if joiner_first else [(0, NODES), (1, NODES)]
        results = [in_thread(nodes.meet, node_list, index, 30.0, port) for index, node_list in order]
        assert [finished(result) for result in results] == [None, None]


def test_the_first_node_alone_names_the_missing_ones_after_the_wait():
    error = finished(in_thread(nodes.meet, [*NODES, "127.0.0.3"], 0, 0.5, free_port()))
    assert error.startswith("node(s) 127.0.0.2, 127.0.0.3 did not join within 0.5 s (train.node_wait_s)")


def test_a_stranger_does_not_count_as_a_node():
    port = free_port()
    first = in_thread(nodes.meet, NODES, 0, 1.0, port)
    stranger = in_thread(nodes.meet, ["127.0.0.1", "127.0.0.9"], 1, 1.0, port)  # names 127.0.0.9
    assert finished(first).startswith("node(s) 127.0.0.2 did not join")
    assert finished(stranger).startswith("the first node 127.0.0.1 did not start the run")


def test_a_node_whose_first_node_refuses_connections_gives_up_after_the_wait():
    port = free_port()  # nothing listens there: every connection is refused at once, and retried
    error = finished(in_thread(nodes.meet, NODES, 1, 0.5, port))
    assert error.startswith(f"the first node 127.0.0.1:{port} could not be reached within 0.5 s")


def test_this_node_is_the_first_address_of_this_machine():
    assert nodes.this_node(["192.0.2.1", "127.0.0.1"]) == 1  # TEST-NET: no machine's own (only bound to)
    with pytest.raises(PlscError, match="none of these addresses is this machine's"):
        nodes.this_node(["192.0.2.1"])


@pytest.mark.parametrize("text, problem", [("127.0.0.1,,127.0.0.2", "an empty address"),
                                           ("127.0.0.1,127.0.0.1", "an address given twice")])
def test_node_lists_with_holes_or_repeats_are_refused(text, problem):
    with pytest.raises(PlscError, match=problem):
        nodes.parse_nodes(text)
    assert nodes.parse_nodes(" 127.0.0.1, 127.0.0.2") == NODES


def test_a_node_that_gave_up_before_the_last_one_came_stops_the_first_node_too():
    """Node 1 waits 0.3 s, node 2 comes later: the first node must not start with node 1 gone."""
    port = free_port()
    three = [*NODES, "127.0.0.3"]
    first = in_thread(nodes.meet, three, 0, 30.0, port)
    early = in_thread(nodes.meet, three, 1, 0.3, port)
    assert finished(early).startswith("the first node 127.0.0.1 did not start the run")
    late = in_thread(nodes.meet, three, 2, 30.0, port)
    assert finished(first).startswith("node(s) 127.0.0.2 gave up waiting before all nodes joined")
    assert finished(late).startswith("the first node 127.0.0.1 stopped the run")


def test_paddles_launcher_reads_the_multi_node_command_as_meant(monkeypatch):
    """launch_command's --ips/--host, parsed by paddle.distributed.launch's own argument parser."""
    from paddle.distributed.launch.context.args_envs import parse_args

    from plsc.launch import launch_command

    command = launch_command(2, ["/bin/python", "-m", "plsc.cli", "train"], ips=NODES, node_rank=1)
    monkeypatch.setattr("sys.argv", ["launch", *command[3:]])  # after "python -m paddle.distributed.launch"
    args = parse_args()[0]
    assert (args.ips, args.host, str(args.nproc_per_node)) == ("127.0.0.1,127.0.0.2", "127.0.0.2", "2")
    assert [args.training_script, *args.training_script_args] == ["/bin/python", "-m", "plsc.cli", "train"]
