"""The hand-built publish frames of shared/amqp_wire.py, decoded by an independent codec (pamqp)."""

from __future__ import annotations

import pytest
from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from shared.amqp_wire import BrokerAddress, _field_table, publish_frames, publish_method_frame


def decode_all(data: bytes) -> list[tuple[int, object]]:
    """Every frame of `data`, as (channel, pamqp object)."""
    frames = []
    while data:
        consumed, channel, value = frame.unmarshal(data)
        frames.append((channel, value))
        data = data[consumed:]
    return frames


def test_single_event_message_decodes_to_the_contract_properties() -> None:
    payload = b'{"s":"site-1","ingest_id":"abc"}'
    method = publish_method_frame("ingest", "event.site-1")
    data = publish_frames(method, payload, message_id="abc", headers={}, frame_max=131072)
    (ch1, publish), (ch2, content), (ch3, chunk) = decode_all(data)
    assert (ch1, ch2, ch3) == (1, 1, 1)
    assert isinstance(publish, commands.Basic.Publish)
    assert (publish.exchange, publish.routing_key, publish.mandatory, publish.immediate) == (
        "ingest", "event.site-1", True, False,
    )
    assert isinstance(content, header.ContentHeader)
    assert content.body_size == len(payload)
    props = content.properties
    assert (props.content_type, props.delivery_mode, props.message_id) == ("application/json", 2, "abc")
    assert not props.headers
    assert isinstance(chunk, pamqp_body.ContentBody) and chunk.value == payload


def test_batch_message_carries_its_headers_and_splits_the_body_at_frame_max() -> None:
    payload = bytes(range(256)) * 40  # 10,240 bytes
    data = publish_frames(
        publish_method_frame("ingest", "event.s"),
        payload,
        message_id="m-1",
        headers={"x-event-count": 50, "big": 2**40, "who": "gateway"},
        frame_max=4096,
    )
    frames = decode_all(data)
    content = frames[1][1]
    assert isinstance(content, header.ContentHeader)
    assert content.properties.headers == {"x-event-count": 50, "big": 2**40, "who": "gateway"}
    bodies = [value for _, value in frames[2:]]
    assert all(isinstance(b, pamqp_body.ContentBody) for b in bodies)
    assert [len(b.value) for b in bodies] == [4088, 4088, 2064]  # frame_max minus 8 bytes of framing
    assert b"".join(b.value for b in bodies) == payload


def test_empty_body_has_no_body_frame() -> None:
    data = publish_frames(publish_method_frame("x", "y"), b"", message_id="m", headers={}, frame_max=4096)
    assert [type(v) for _, v in decode_all(data)] == [commands.Basic.Publish, header.ContentHeader]


def test_header_values_other_than_int_and_str_are_refused() -> None:
    with pytest.raises(TypeError):
        _field_table({"flag": True})
    with pytest.raises(ValueError):
        _field_table({"k" * 256: 1})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/rk", BrokerAddress("127.0.0.1", 5672, "guest", "guest", "rk")),
        ("amqp://u%40x:p%2Fw@broker/", BrokerAddress("broker", 5672, "u@x", "p/w", "/")),
        ("amqp://broker:5673/%2F", BrokerAddress("broker", 5673, "guest", "guest", "/")),
        ("amqp://a:b@h/v%2Fhost", BrokerAddress("h", 5672, "a", "b", "v/host")),
    ],
)
def test_broker_address_from_url(url: str, expected: BrokerAddress) -> None:
    assert BrokerAddress.from_url(url) == expected


def test_tls_urls_are_refused_rather_than_sent_in_clear() -> None:
    with pytest.raises(ValueError):
        BrokerAddress.from_url("amqps://guest:guest@broker/")


def test_reconnect_delays_double_up_to_their_cap() -> None:
    from itertools import islice

    from shared.amqp import reconnect_delays

    assert list(islice(reconnect_delays(), 7)) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
