"""A gradwatch webhook receiver in the standard library: verify the Standard Webhooks signature, print the alert.

    WEBHOOK_SECRET=whsec_... PORT=9000 python examples/webhook_receiver.py
"""

import base64
import hashlib
import hmac
import json
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

KEY = base64.b64decode(os.environ["WEBHOOK_SECRET"].removeprefix("whsec_"))


class Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        msg_id, ts = self.headers["webhook-id"], self.headers["webhook-timestamp"]
        mac = hmac.new(KEY, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(mac).decode()
        ok = abs(time.time() - int(ts)) < 300 and any(
            hmac.compare_digest(expected, sig) for sig in self.headers["webhook-signature"].split())
        self.send_response(204 if ok else 401)
        self.end_headers()
        if ok:  # a retry of a delivery whose answer was lost carries the same msg_id: de-duplicate on it
            alert = json.loads(body)["alerts"][0]
            print(alert["status"], alert["labels"]["run"], alert["labels"]["signature"], msg_id, flush=True)


HTTPServer(("127.0.0.1", int(os.environ.get("PORT", "9000"))), Hook).serve_forever()
