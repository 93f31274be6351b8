"""A too-many-images 400 counts every image it refused in convserve_rejected_images_total."""

from __future__ import annotations

import base64

from tests import images
from tests.conftest import LiveServer
from tests.service.helpers import rejected


def test_too_many_images_counts_each_refused_image(server: LiveServer) -> None:
    limit = 64  # the default max_images_per_request of the shared server
    count = limit + 6
    before = rejected(server, "bad_request")
    b64 = base64.b64encode(images.jpeg()).decode()
    r = server.client.post("/v1/predict", json={"images": [b64] * count})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    assert str(count) in r.json()["error"]["message"]
    assert rejected(server, "bad_request") == before + count
