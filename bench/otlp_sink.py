# A minimal OTLP/HTTP sink for the drain measurement: answers 200 to every
# POST /v1/traces and counts requests and bytes (printed on SIGTERM/exit).
import http.server, signal, sys, threading
stats = {"requests": 0, "bytes": 0}
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        body = self.rfile.read(n)
        with lock:
            stats["requests"] += 1; stats["bytes"] += n; stats["publish_spans"] = stats.get("publish_spans", 0) + body.count(b"outbox.waited_ms")
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
def stop(*_):
    print(stats, flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
s.serve_forever()
