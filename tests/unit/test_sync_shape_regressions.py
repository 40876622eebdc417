"""Bodies Schemathesis found answering 500 (docs/openapi.yaml contract run): each must be a clean 400."""

from __future__ import annotations

import orjson
import pytest

from shared.events import ShapeError, parse_sync_body


@pytest.mark.parametrize("site", [{}, [], {"a": 1}, ["site-a"]])
def test_batch_with_an_unhashable_site_is_invalid_batch(site: object) -> None:
    body = orjson.dumps({"events": [{"s": site, "url": "https://example.com/"}]})
    with pytest.raises(ShapeError) as exc:
        parse_sync_body(body)
    assert exc.value.code == "invalid_batch"


def test_batch_whose_sites_differ_only_in_type_is_invalid_batch() -> None:
    body = orjson.dumps({"events": [{"s": "1", "url": "https://a/"}, {"s": 1, "url": "https://a/"}]})
    with pytest.raises(ShapeError) as exc:
        parse_sync_body(body)
    assert exc.value.code == "invalid_batch"
