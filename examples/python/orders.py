#!/usr/bin/env python3
"""syncar from Python, with `requests`: a read-modify-write loop on ETags, read-your-writes
across two instances, and retrying after a 503.

    pip install -r examples/python/requirements.txt
    SYNCAR_A=http://127.0.0.1:7070 SYNCAR_B=http://127.0.0.1:7070 python examples/python/orders.py

Each step checks that syncar behaves as its README says; the exit status is 1 if one does not,
so this doubles as a test (scripts/run-examples.sh).
"""

import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

SYNCAR_A = os.environ.get("SYNCAR_A", "http://127.0.0.1:7070").rstrip("/")
SYNCAR_B = os.environ.get("SYNCAR_B", "http://127.0.0.1:7070").rstrip("/")
# (connect, read) in seconds. The read timeout is above syncar's server.request_timeout (10 s),
# so a slow request gets syncar's own 504 rather than a timeout of ours.
TIMEOUT = (2, 15)

session = requests.Session()  # keeps connections to syncar open between requests


class Failed(Exception):
    """A step did not behave as documented."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def log(message: str) -> None:
    print(message, flush=True)


def error_code(resp: requests.Response) -> str | None:
    """The `code` of syncar's error body, {"error": {"code": ..., "message": ...}}."""
    try:
        return resp.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def version_of(resp: requests.Response) -> int:
    """The version in an ETag: `"42"` is version 42, and so is `"42-7"` (the same row version
    rendered in the shape its table took at version 7, after a schema change)."""
    return int(resp.headers["ETag"].removeprefix("W/").strip('"').split("-")[0])


# --- 503 and Retry-After --------------------------------------------------------------------

# syncar answers 503 with Retry-After (seconds) and says why in the error code:
#   overloaded   too many requests in flight: turned away before anything was done;
#   starting     the schema is not loaded yet: nothing was done either;
#   unavailable  Postgres could not be reached, possibly in the middle of this very write.
NOTHING_DONE = {"overloaded", "starting"}


def send(
    method: str, url: str, *, max_attempts: int = 4, max_wait: float = 5.0, **kwargs
) -> requests.Response:
    """One request to syncar, sent again after its Retry-After while that is safe.

    A read changes nothing, so a GET is retried on any 503 and on a network error. A write is
    retried only when the error code says nothing was done. A write that failed any other way
    (503 `unavailable`, 504 `timeout`, our own timeout, a dropped connection) has an unknown
    outcome: it may have committed. Sending it again blindly could apply it twice, or undo a
    change someone else made in between. A conditional write is the exception: with
    `If-Match: "<version>"` (or `If-None-Match: *`) a second copy can only succeed if the first
    did not, and gets 412 if it did, so retrying it is safe. (`If-Match: *` is not enough: it
    only asks that the document exist.)
    """
    headers = {name.lower(): value for name, value in (kwargs.get("headers") or {}).items()}
    conditional = headers.get("if-match", "*") != "*" or headers.get("if-none-match") == "*"
    safe = method in ("GET", "HEAD") or conditional
    for attempt in range(1, max_attempts + 1):
        last = attempt == max_attempts
        try:
            resp = session.request(method, url, timeout=TIMEOUT, **kwargs)
        except (requests.ConnectionError, requests.Timeout):
            if not safe or last:
                raise  # the caller must find out what happened (read the document again)
            time.sleep(0.5 * attempt)
            continue
        code = error_code(resp) if resp.status_code == 503 else None
        if resp.status_code != 503 or last or not (safe or code in NOTHING_DONE):
            return resp
        try:
            wait = min(float(resp.headers.get("Retry-After", 1)), max_wait)
        except ValueError:  # an HTTP date: syncar sends seconds
            wait = 1.0
        log(f"    503 {code} (attempt {attempt}/{max_attempts}): retrying in {wait:g} s")
        time.sleep(wait)
    raise AssertionError("unreachable")


# --- Read-modify-write with ETag and If-Match -----------------------------------------------


def update(base: str, path: str, change, *, max_attempts: int = 5) -> tuple[int, dict]:
    """Optimistic concurrency: GET the document and its ETag, apply `change` to it, PUT the
    result with `If-Match: <ETag>`. A 412 means someone wrote in between: read it again and
    redo the change on the new copy. `change(doc)` gets None when the document does not exist
    (it is then created, with `If-None-Match: *`) and may run several times, so it must only
    compute. Returns the version written and the document."""
    url = f"{base}/v1/{path}"
    params = {}
    for _ in range(max_attempts):
        resp = send("GET", url, params=params)
        if resp.status_code == 404:
            doc, condition = change(None), {"If-None-Match": "*"}
        else:
            check(resp.status_code == 200, f"GET {path}: {resp.status_code} {resp.text}")
            doc, condition = change(resp.json()), {"If-Match": resp.headers["ETag"]}
        put = send("PUT", url, json=doc, headers=condition)
        if put.status_code in (200, 201):
            return put.json()["version"], doc
        check(put.status_code == 412, f"PUT {path}: {put.status_code} {put.text}")
        check(error_code(put) == "precondition_failed", f"412 with code {error_code(put)}")
        log(f"    412 precondition_failed: {path} changed since we read it; reading it again")
        # Our copy was older than Postgres'. Read Postgres itself next, not a cached copy.
        params = {"consistency": "strong"}
    raise Failed(f"{path}: still conflicting after {max_attempts} attempts")


def add_item(name: str, cents: int):
    """A change for update(): add one item to an order, creating the order if needed."""

    def change(order: dict | None) -> dict:
        order = order or {"status": "open", "items": [], "total_cents": 0}
        return {
            **order,
            "items": [*order["items"], name],
            "total_cents": order["total_cents"] + cents,
        }

    return change


# --- A stand-in that answers like an overloaded syncar --------------------------------------


class FlakyFront(ThreadingHTTPServer):
    """Sits in front of syncar A: answers the next requests with syncar's own 503s, one per code
    in `faults`, and passes every other request through. syncar answers 503 only when it is
    overloaded or cannot reach Postgres, which this example cannot cause on demand."""

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _FrontHandler)
        self.upstream, self.faults, self.requests = upstream, [], 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _FrontHandler(BaseHTTPRequestHandler):
    server: FlakyFront

    def _handle(self) -> None:
        self.server.requests += 1
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.faults:
            code = self.server.faults.pop(0)
            error = {"error": {"code": code, "message": "injected by the example"}}
            status, payload = 503, json.dumps(error).encode()
            headers = {"Content-Type": "application/json", "Retry-After": "1"}
        else:
            names = ("Content-Type", "If-Match", "If-None-Match")
            forward = {name: self.headers[name] for name in names if name in self.headers}
            url = self.server.upstream + self.path
            up = requests.request(self.command, url, data=body, headers=forward, timeout=TIMEOUT)
            status, payload = up.status_code, up.content
            names = ("Content-Type", "ETag", "Retry-After", "X-Cache")
            headers = {name: up.headers[name] for name in names if name in up.headers}
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_DELETE = _handle

    def log_message(self, *args) -> None:
        pass


# --- The walk-through -----------------------------------------------------------------------


def main() -> None:
    path = f"kv/orders/{uuid.uuid4().hex[:8]}"  # resource kv takes any JSON; keys may hold /
    log(f"syncar A = {SYNCAR_A}, syncar B = {SYNCAR_B}, document {path}")

    log("1. read-modify-write with ETag and If-Match")
    version, order = update(SYNCAR_A, path, add_item("apple", 120))
    check(order["items"] == ["apple"], f"created {order}")
    items = ", ".join(order["items"])
    log(f"    created through A (it was absent): version {version}, items {items}")

    # Another client adds a plum through B after we read the order and before we write it.
    plum_version = None

    def add_pear_racing_a_plum(order: dict | None) -> dict:
        nonlocal plum_version
        if plum_version is None:
            plum_version, _ = update(SYNCAR_B, path, add_item("plum", 90))
            log(f"    meanwhile another client wrote version {plum_version} through B")
        return add_item("pear", 150)(order)

    version, order = update(SYNCAR_A, path, add_pear_racing_a_plum)
    check(order["items"] == ["apple", "plum", "pear"], f"lost update: {order}")
    check(order["total_cents"] == 360, f"total {order['total_cents']}")
    items = ", ".join(order["items"])
    log(f"    written through A: version {version}, items {items}: no update lost")

    log("2. read-your-writes across instances with min_version")
    resp = send("GET", f"{SYNCAR_B}/v1/{path}")  # B may now hold this copy in its L1
    check(resp.status_code == 200, f"GET via B: {resp.status_code} {resp.text}")
    log(f"    GET through B: version {version_of(resp)} (X-Cache: {resp.headers.get('X-Cache')})")

    def mark_paid(order: dict | None) -> dict:
        check(order is not None, f"{path} vanished")
        return {**order, "status": "paid"}

    written, paid = update(SYNCAR_A, path, mark_paid)
    log(f"    PUT through A: version {written}, status paid")
    # Without min_version, B could still answer the copy it holds, for up to about a second.
    resp = send("GET", f"{SYNCAR_B}/v1/{path}", params={"min_version": written})
    check(resp.status_code == 200, f"GET via B: {resp.status_code} {resp.text}")
    check(version_of(resp) >= written, f"B answered version {version_of(resp)} < {written}")
    check(resp.json() == paid, f"B answered {resp.json()}")
    log(
        f"    GET through B with ?min_version={written}: version {version_of(resp)},"
        f" status {resp.json()['status']} (X-Cache: {resp.headers.get('X-Cache')})"
    )

    log("3. 503 with Retry-After (syncar's 503s injected in front of A)")
    front = FlakyFront(SYNCAR_A)
    url = f"{front.url}/v1/{path}"

    def inject(*codes: str) -> None:
        front.faults, front.requests = list(codes), 0

    def expect(resp: requests.Response, status: int, requests_seen: int, what: str) -> None:
        check(
            resp.status_code == status and front.requests == requests_seen,
            f"{what}: {resp.status_code} after {front.requests} requests",
        )

    try:
        inject("overloaded")
        started = time.monotonic()
        resp = send("GET", url)
        elapsed = time.monotonic() - started
        expect(resp, 200, 2, "GET")
        check(elapsed >= 1, f"retried after {elapsed:.2f} s, before Retry-After")
        log(f"    GET: 200 on the second attempt, {elapsed:.1f} s later")

        inject("overloaded", "overloaded", "overloaded")
        resp = send("GET", url, max_attempts=2)
        expect(resp, 503, 2, "GET")
        log(f"    GET, still overloaded: gave up after 2 attempts, 503 {error_code(resp)}")

        inject("unavailable")
        resp = send("PUT", url, json={**paid, "status": "shipped"})
        expect(resp, 503, 1, "PUT")
        log("    unconditional PUT, 503 unavailable: not retried, it may have committed")
        resp = send("GET", url, params={"consistency": "strong"})
        check(resp.json()["status"] == "paid", f"the PUT was applied: {resp.json()}")
        log(f"    so we read it again: status still {resp.json()['status']}, it did not")

        etag = resp.headers["ETag"]
        inject("unavailable")
        resp = send("PUT", url, json={**paid, "status": "shipped"}, headers={"If-Match": etag})
        expect(resp, 200, 2, "PUT")
        log(f"    PUT with If-Match: {etag}, 503 unavailable: retried, version {version_of(resp)}")

        inject("overloaded")
        resp = send("PUT", url, json={**paid, "status": "delivered"})
        expect(resp, 200, 2, "PUT")
        log(f"    unconditional PUT, 503 overloaded: retried, version {version_of(resp)}")
    finally:
        front.shutdown()
        front.server_close()

    resp = send("DELETE", f"{SYNCAR_A}/v1/{path}", headers={"If-Match": resp.headers["ETag"]})
    check(resp.status_code == 204, f"DELETE: {resp.status_code} {resp.text}")
    log(f"4. deleted {path} with If-Match: 204, the delete is version {version_of(resp)}")


if __name__ == "__main__":
    try:
        main()
    except (Failed, requests.RequestException) as e:
        log(f"FAILED: {e}")
        sys.exit(1)
    log("python example: every step behaved as documented")
