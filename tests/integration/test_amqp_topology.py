"""SPEC §2's RabbitMQ topology, as the gateway declares it in an empty vhost and as the broker reports it:
names, kinds, durability, quorum queues and bindings are the contract downstream consumers bind to."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shared.settings import Settings
from tests.conftest import amqp_url_for
from tests.support.gateway import gateway_client, wait_for_amqp


def rabbitmqctl_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args, "--formatter", "json"], check=True, capture_output=True, timeout=60
    )
    return list(json.loads(out.stdout))


@pytest.fixture
def empty_vhost() -> Iterator[str]:
    vhost = f"rk-topology-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True, capture_output=True, timeout=60,
    )
    yield vhost
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=True, capture_output=True, timeout=60)


def contract_bindings(vhost: str) -> set[tuple[str, str, str]]:
    return {
        (b["source_name"], b["destination_name"], b["routing_key"])
        for b in rabbitmqctl_json(
            "list_bindings", "-p", vhost, "source_name", "destination_name", "routing_key"
        )
        if b["source_name"]  # the default exchange binds every queue by its name
    }


async def test_the_gateway_declares_the_contract_topology(settings: Settings, empty_vhost: str) -> None:
    async with gateway_client(settings.with_overrides(amqp_url=amqp_url_for(empty_vhost))) as client:
        await wait_for_amqp(client)
        deadline = time.monotonic() + 30
        while len(bindings := contract_bindings(empty_vhost)) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the command bus declares on its own connection

    exchanges = {
        e["name"]: (e["type"], e["durable"])
        for e in rabbitmqctl_json("list_exchanges", "-p", empty_vhost, "name", "type", "durable")
    }
    assert exchanges["ingest"] == ("topic", True)
    assert exchanges["billing.commands"] == ("direct", True)
    assert exchanges["billing.dead-letter"] == ("fanout", True)

    queues = {
        q["name"]: q
        for q in rabbitmqctl_json("list_queues", "-p", empty_vhost, "name", "type", "durable", "arguments")
    }
    assert set(queues) == {"ingest.events", "reconciler.commands", "freezer.commands", "billing.dead-letter"}
    for queue in queues.values():
        assert (queue["type"], queue["durable"]) == ("quorum", True), queue
    for name in ("reconciler.commands", "freezer.commands"):
        arguments = {key: value for key, _kind, value in queues[name]["arguments"]}
        # poison commands: bounded redeliveries, then the dead-letter exchange (SPEC §2)
        assert arguments["x-dead-letter-exchange"] == "billing.dead-letter"
        assert 1 <= arguments["x-delivery-limit"] <= 10

    assert bindings == {
        ("ingest", "ingest.events", "event.#"),
        ("billing.commands", "reconciler.commands", "reconciler.commands"),
        ("billing.commands", "freezer.commands", "freezer.commands"),
        ("billing.dead-letter", "billing.dead-letter", "billing.dead-letter"),  # fanout: key unused
    }
