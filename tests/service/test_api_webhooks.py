"""/v1/webhooks over HTTP: subscriptions, the secret shown once, rotation, and the refusals."""

from __future__ import annotations

import httpx

TARGET = "https://hooks.example.com/gradwatch"


def _create(http: httpx.Client, **fields: object) -> dict:
    r = http.post("/v1/webhooks", json={"url": TARGET, "enabled": False, **fields})  # disabled: never sent
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_create_shows_the_secret_once_and_list_get_never_do(http: httpx.Client) -> None:
    sub = _create(http, project="vision", min_severity="critical", name="oncall")
    assert sub["secret"].startswith("whsec_") and len(sub["secret"]) > 40
    assert (sub["url"], sub["project"], sub["min_severity"], sub["enabled"], sub["name"]) == (
        TARGET, "vision", "critical", False, "oncall")
    listed = http.get("/v1/webhooks").json()["subscriptions"]
    mine = next(s for s in listed if s["id"] == sub["id"])
    assert "secret" not in mine and "secret" not in http.get(f"/v1/webhooks/{sub['id']}").json()
    assert sub["secret"] not in http.get("/v1/webhooks").text
    assert _create(http)["name"] == "hooks.example.com"  # default receiver name: the host
    http.delete(f"/v1/webhooks/{sub['id']}")


def test_update_rotate_and_delete(http: httpx.Client) -> None:
    sub = _create(http, project="vision")
    r = http.patch(f"/v1/webhooks/{sub['id']}", json={"project": None, "min_severity": "critical"})
    assert r.status_code == 200
    assert (r.json()["project"], r.json()["min_severity"], r.json()["url"]) == (None, "critical", TARGET)
    rotated = http.post(f"/v1/webhooks/{sub['id']}/rotate-secret").json()["secret"]
    assert rotated.startswith("whsec_") and rotated != sub["secret"]
    assert http.get(f"/v1/webhooks/{sub['id']}/deliveries").json() == {"deliveries": [], "count": 0}
    gone = http.delete(f"/v1/webhooks/{sub['id']}")
    assert gone.status_code == 200 and gone.json()["id"] == sub["id"] and "secret" not in gone.json()
    for method, path in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/rotate-secret"),
                         ("GET", "/deliveries")):
        r = http.request(method, f"/v1/webhooks/{sub['id']}{path}", json={} if method == "PATCH" else None)
        assert r.status_code == 404, (method, path)


def test_refusals(http: httpx.Client) -> None:
    for url in ("http://127.0.0.1:9000/hook", "http://localhost/hook", "http://10.0.0.7/hook",
                "http://169.254.169.254/latest", "http://[::1]/hook"):
        r = http.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422 and "refused" in r.text, url
    for body in ({"url": "ftp://example.com/x"}, {"url": TARGET, "min_severity": "info"}, {"url": TARGET, "x": 1},
                 {"url": TARGET, "project": "no spaces"}):
        assert http.post("/v1/webhooks", json=body).status_code == 422, body
    sub = _create(http)
    assert http.patch(f"/v1/webhooks/{sub['id']}", json={"url": "http://127.0.0.1/x"}).status_code == 422
    assert http.post(f"/v1/webhooks/{sub['id']}/deliveries/999999/resend").status_code == 404
    http.delete(f"/v1/webhooks/{sub['id']}")
