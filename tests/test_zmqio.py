"""psepr.zmqio: multipart helpers behave like pyzmq's send/recv_multipart.

(recv_frames_user needs a ZAP-authenticated socket: tests/test_security.py runs it.)
"""

import pytest
import zmq

from psepr.zmqio import recv_frames, send_frames


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://zmqio")
    b.connect("inproc://zmqio")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()


def test_round_trip_keeps_frames_and_boundaries(pair):
    a, b = pair
    send_frames(a, [b"\x04", b"{}", b"", b"x" * 70_000])
    send_frames(a, [b"one"])
    send_frames(a, [b"h", b"body"], first=b"ident")
    assert recv_frames(b) == [b"\x04", b"{}", b"", b"x" * 70_000]
    assert recv_frames(b) == [b"one"]
    assert recv_frames(b) == [b"ident", b"h", b"body"]
    with pytest.raises(zmq.Again):
        recv_frames(b)


def test_interoperates_with_pyzmq_multipart(pair):
    a, b = pair
    a.send_multipart([b"a", b"b", b"c"])
    assert recv_frames(b) == [b"a", b"b", b"c"]
    send_frames(b, [b"d", b"e"])
    assert a.recv_multipart() == [b"d", b"e"]


def test_full_queue_raises_again_and_sends_nothing():
    ctx = zmq.Context()
    a = ctx.socket(zmq.DEALER)
    a.setsockopt(zmq.SNDHWM, 1)
    a.setsockopt(zmq.LINGER, 0)
    a.connect("tcp://127.0.0.1:9")   # nobody there: the queue never drains
    try:
        with pytest.raises(zmq.Again):
            for _ in range(10_000):
                send_frames(a, [b"k", b"h", b"b"])
    finally:
        a.close(linger=0)
        ctx.term()
