"""Several nodes meet before any rank starts: ``plsc train --nodes IP,IP,... --nproc N`` on every node.

paddle.distributed.launch with fixed endpoints (``--ips``) starts the ranks at once, and a node that never
comes leaves the others blocked in their first collective until Paddle's own timeout ends each rank in a
traceback. plsc meets first: the first node listens on :data:`MEETING_PORT`, every other node connects and
names itself, and the first node answers once all have come. Whoever is still missing after
``train.node_wait_s`` is named in one line, on every node that waited, and nothing was started.
"""

from __future__ import annotations

import contextlib
import socket
import time

from plsc.errors import PlscError

# One below the launcher's first endpoint port (its --start_port, 6070, as in PLSC v2.2's fixed endpoints).
MEETING_PORT = 6069
_HELLO = b"plsc-node "  # + the joining node's address and a newline
# Once all joined, the first node asks each whether it is still there (a node whose own wait ran out has
# left), and only when all answer tells them to go: no node starts ranks that the others will not meet.
_CHECK = b"plsc-check\n"
_READY = b"plsc-ready\n"
_GO = b"plsc-go\n"
_ANSWER_WAIT_S = 10.0  # for the answers, which follow at once
_RETRY_S = 0.2  # between connection attempts to a first node that is not listening yet
_LINE_LIMIT = 64  # an address line is short; more is not a plsc node


def parse_nodes(text: str) -> list[str]:
    """``IP,IP,...`` -> the addresses, each once, in order; PlscError for an empty entry or a repeat."""
    nodes = [part.strip() for part in text.split(",")]
    if any(not node for node in nodes):
        raise PlscError(f"--nodes {text!r}: an empty address (expected IP,IP,...)")
    if len(set(nodes)) != len(nodes):
        raise PlscError(f"--nodes {text!r}: an address given twice")
    return nodes


def this_node(nodes: list[str]) -> int:
    """The position of this machine in ``nodes``: the first address it can listen on."""
    for index, address in enumerate(nodes):
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind((address, 0))
            return index
    raise PlscError(f"--nodes {','.join(nodes)}: none of these addresses is this machine's")


def meet(nodes: list[str], index: int, wait_s: float, port: int = MEETING_PORT) -> None:
    """Return once every node in ``nodes`` is there; PlscError naming the missing ones after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    if index == 0:
        _gather(nodes, port, deadline, wait_s)
    else:
        _join(nodes[0], nodes[index], port, deadline, wait_s)


def _gather(nodes: list[str], port: int, deadline: float, wait_s: float) -> None:
    """The first node: accept the others until all came or the time is up; then tell each to go."""
    waiting = set(nodes[1:])
    joined: dict[str, socket.socket] = {}
    try:
        with socket.create_server((nodes[0], port)) as server:
            while waiting and (remaining := deadline - time.monotonic()) > 0:
                server.settimeout(remaining)
                with contextlib.suppress(socket.timeout):
                    peer, _ = server.accept()
                    name = _hello(peer, deadline)
                    if name in waiting:
                        waiting.discard(name)
                        joined[name] = peer
                    else:
                        peer.close()  # not one of ours: a stray connection or a node joined twice
        if waiting:
            missing = ", ".join(node for node in nodes if node in waiting)
            raise PlscError(f"node(s) {missing} did not join within {wait_s:g} s (train.node_wait_s): run "
                            f"the same command there, and check that they reach {nodes[0]}:{port}")
        _start_all(joined, nodes, port)
    except OSError as exc:
        reason = exc.strerror or exc
        raise PlscError(f"cannot wait for the other nodes on {nodes[0]}:{port}: {reason}") from None
    finally:
        for peer in joined.values():
            peer.close()


def _start_all(joined: dict[str, socket.socket], nodes: list[str], port: int) -> None:
    """Check that every joined node is still there, then tell all to go (see _CHECK)."""
    _send_all(joined, _CHECK)
    deadline = time.monotonic() + _ANSWER_WAIT_S
    gone = [name for name, peer in joined.items() if _read_line(peer, deadline) != _READY]
    if not gone:
        _send_all(joined, _GO)
    else:  # closing the connections tells the others to stop
        raise PlscError(f"node(s) {', '.join(gone)} gave up waiting before all nodes joined: start them "
                        f"again, or raise train.node_wait_s (the time each node waits for {nodes[0]}:{port})")


def _send_all(joined: dict[str, socket.socket], message: bytes) -> None:
    for peer in joined.values():
        with contextlib.suppress(OSError):  # a node that is gone is found by its missing answer
            peer.sendall(message)


def _hello(peer: socket.socket, deadline: float) -> str | None:
    """The address a joining node names, or None for anything else."""
    line = _read_line(peer, deadline)
    return line[len(_HELLO):].decode(errors="replace").strip() if line.startswith(_HELLO) else None


def _read_line(peer: socket.socket, deadline: float) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while not data.endswith(b"\n") and len(data) < _LINE_LIMIT:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            peer.settimeout(remaining)
            chunk = peer.recv(_LINE_LIMIT - len(data))
            if not chunk:
                break
            data += chunk
    return data


def _join(first: str, me: str, port: int, deadline: float, wait_s: float) -> None:
    """Any other node: reach the first node, name itself, wait for its go."""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            with socket.create_connection((first, port), timeout=remaining) as conn:
                conn.sendall(_HELLO + me.encode() + b"\n")
                if _read_line(conn, deadline) == _CHECK:
                    conn.sendall(_READY)
                    if _read_line(conn, time.monotonic() + _ANSWER_WAIT_S) == _GO:
                        return
                    raise PlscError(f"the first node {first} stopped the run: another node gave up waiting "
                                    f"(the first node's output names it)")
                raise PlscError(f"the first node {first} did not start the run within {wait_s:g} s "
                                f"(train.node_wait_s): another node is missing (its own output names it)")
        except OSError:
            time.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))
    raise PlscError(f"the first node {first}:{port} could not be reached within {wait_s:g} s "
                    f"(train.node_wait_s): start the same command there")
