"""A webhook receiver for Volley's tests: verifies every delivery with the Standard Webhooks
reference library (`standardwebhooks` from PyPI), never with Volley's own code.

    webhook_receiver.py --log FILE --secret whsec_... [--secret ...] [--fail-first N] [--port P]
    webhook_receiver.py --log FILE --tenant NAME=whsec_... [--tenant ...] [--fail-first N] ...

Listens on 127.0.0.1 (port 0 picks one) and prints `listening <port>` once ready. A POST to
`/tenant/NAME` is verified with that tenant's secret only (as a service verifies each
customer's endpoint with that customer's secret), any other POST against each `--secret`; the
first N deliveries (counted across restarts, from the log) are answered 500, the rest 204 when
one secret verified it and 400 otherwise. Each delivery is appended to FILE as one JSON line
(so the record survives the receiver being killed and started again): its webhook-id, type,
tenant (null off the tenant paths), which of the secrets tried verified it (their indexes:
for a tenant path, [0] is its own secret), the answer, the body. `GET /deliveries` answers
the whole log as a JSON array.
"""

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--secret", action="append", default=[])
    p.add_argument("--tenant", action="append", default=[], metavar="NAME=SECRET")
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if not args.secret and not args.tenant:
        p.error("give at least one --secret or --tenant")
    hooks = [Webhook(s) for s in args.secret]
    tenants = {}
    for t in args.tenant:
        name, sep, secret = t.partition("=")
        if not sep or not name or "/" in name:
            p.error(f"--tenant wants NAME=SECRET, got {t!r}")
        tenants[name] = Webhook(secret)
    lock = threading.Lock()

    def read_log() -> list:
        if not os.path.exists(args.log):
            return []
        with open(args.log, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:  # quiet
            pass

        def answer(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/deliveries":
                return self.answer(404)
            with lock:
                records = read_log()
            self.answer(200, json.dumps(records).encode())

        def do_POST(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            if n > MAX_BODY:
                return self.answer(413)
            body = self.rfile.read(n)
            headers = {k: v for k, v in self.headers.items()}
            tenant = None
            candidates = hooks
            if self.path.startswith("/tenant/"):
                tenant = self.path[len("/tenant/"):]
                # An unknown tenant has no secret: nothing verifies, the answer is 400.
                candidates = [tenants[tenant]] if tenant in tenants else []
            verified = []
            for i, hook in enumerate(candidates):
                try:
                    hook.verify(body, headers)
                    verified.append(i)
                except WebhookVerificationError:
                    pass
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            with lock:
                seen = len(read_log())
                if seen < args.fail_first:
                    code = 500
                elif verified:
                    code = 204
                else:
                    code = 400
                record = {
                    "webhook_id": headers.get("webhook-id") or headers.get("Webhook-Id"),
                    "type": (payload or {}).get("type") if isinstance(payload, dict) else None,
                    "tenant": tenant,
                    "verified_with": verified,
                    "signatures": len((headers.get("webhook-signature") or "").split()),
                    "answered": code,
                    "path": self.path,
                    "body": payload,
                }
                with open(args.log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
            self.answer(code, b'{"seen": true}' if code == 500 else b"")

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
