"""A tiny in-memory Google Cloud Storage server on 127.0.0.1, for offline gs:// tests.

Every client a gs:// workdir goes through reaches it, unmodified:

- TensorStore (Orbax's arrays): `TENSORSTORE_GCS_HTTP_URL` points its gcs driver here.
- google-cloud-storage (Orbax's bucket lookups): `STORAGE_EMULATOR_HOST`.
- tf.io.gfile (epath's gs:// backend when TensorFlow is installed, TensorBoard's event files):
  its endpoints are fixed https://www.googleapis.com and https://storage.googleapis.com, so
  the server is also an HTTPS proxy (`HTTPS_PROXY`) that answers CONNECT for those hosts
  itself, with a self-signed certificate that `CURL_CA_BUNDLE` makes TensorFlow's curl trust.

Only the JSON API subset these clients use is served: bucket metadata and storage layout
(a flat namespace); object metadata,
download (with Range), list (prefix, delimiter), upload (media, multipart, resumable), delete,
rewrite; generation preconditions. Objects live in one dict, shared by every connection.
`FakeGCS().env()` is the environment a subprocess needs to use it.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import http.server
import json
import os
import re
import socketserver
import ssl
import tempfile
import threading
from urllib.parse import parse_qs, unquote, urlsplit

_TLS_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def _self_signed(directory: str) -> tuple[str, str]:
    """(cert path, key path) of a self-signed certificate for the Google API hosts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-gcs")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(h) for h in _TLS_HOSTS]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class _Store:
    def __init__(self):
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.uploads: dict[str, dict] = {}
        self.generation = 0

    def put(self, bucket: str, name: str, data: bytes, query: dict) -> tuple[int, dict]:
        with self.lock:
            old = self.objects.get((bucket, name))
            if not _preconditions_hold(old, query):
                return 412, {"error": {"code": 412, "message": "precondition failed"}}
            self.generation += 1
            self.objects[(bucket, name)] = (data, self.generation)
            return 200, _resource(bucket, name, data, self.generation)


def _preconditions_hold(old, query: dict) -> bool:
    gen = old[1] if old else 0
    match = query.get("ifGenerationMatch")
    not_match = query.get("ifGenerationNotMatch")
    return (match is None or int(match) == gen) and (not_match is None or int(not_match) != gen)


def _resource(bucket: str, name: str, data: bytes, generation: int) -> dict:
    return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(len(data)),
            "generation": str(generation), "metageneration": "1",
            "id": f"{bucket}/{name}/{generation}", "contentType": "application/octet-stream",
            "updated": "2026-01-01T00:00:00.000Z", "timeCreated": "2026-01-01T00:00:00.000Z"}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: _Store
    tls: ssl.SSLContext
    base: str

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, code: int, body=b"", headers=None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self):
        self._send(404, {"error": {"code": 404, "message": "Not Found"}})

    def do_CONNECT(self):
        # tf.io.gfile's https requests come through here: answer them ourselves over TLS.
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.wfile.flush()
        conn = self.tls.wrap_socket(self.connection, server_side=True)
        self.connection = conn
        self.rfile = conn.makefile("rb", -1)
        self.wfile = conn.makefile("wb", 0)
        self.close_connection = False
        while not self.close_connection:
            self.handle_one_request()

    def _route(self):
        url = urlsplit(self.path)
        path, query = url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}
        if path.startswith("/download/"):
            path = path[len("/download"):]
        return path, query

    def handle_one_request(self):
        # Bucket "denied" answers every request 403, as GCS does without permission.
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        if "/denied/" in urlsplit(self.path).path + "/" and self.command != "CONNECT":
            self._body()
            return self._send(403, {"error": {"code": 403, "message": "denied: no access"}})
        method = getattr(self, f"do_{self.command}", None)
        if method is None:
            return self._send(501, b"")
        method()
        self.wfile.flush()

    # ------------------------------------------------------------------ verbs

    def do_GET(self):
        path, query = self._route()
        m = re.fullmatch(r"/storage/v1/b/([^/]+)", path)
        if m:
            return self._send(200, {"kind": "storage#bucket", "name": m[1], "id": m[1],
                                    "location": "US", "metageneration": "1",
                                    "hierarchicalNamespace": {"enabled": False}})
        m = re.fullmatch(r"/storage/v1/b/([^/]+)/storageLayout", path)
        if m:  # tf.io.gfile asks before renaming (a hierarchical-namespace bucket has folders)
            return self._send(200, {"kind": "storage#storageLayout", "bucket": m[1],
                                    "location": "US", "locationType": "multi-region",
                                    "hierarchicalNamespace": {"enabled": False}})
        m = re.fullmatch(r"/storage/v1/b/([^/]+)/o", path)
        if m:
            return self._list(m[1], query)
        m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)
        if m:
            return self._get(m[1], unquote(m[2]), query, media=query.get("alt") == "media")
        m = re.fullmatch(r"/([^/]+)/(.+)", path)  # storage.googleapis.com/<bucket>/<object>
        if m:
            return self._get(m[1], unquote(m[2]), query, media=True)
        self._not_found()

    do_HEAD = do_GET

    def _get(self, bucket, name, query, media):
        with self.store.lock:
            obj = self.store.objects.get((bucket, name))
        if obj is None:
            return self._not_found()
        data, gen = obj
        if not _preconditions_hold(obj, query):
            code = 304 if "ifGenerationNotMatch" in query else 412
            return self._send(code, b"" if code == 304 else {"error": {"code": 412}})
        if not media:
            return self._send(200, _resource(bucket, name, data, gen))
        headers = {"x-goog-generation": str(gen), "Content-Type": "application/octet-stream"}
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start = int(rng[1]) if rng[1] else max(len(data) - int(rng[2]), 0)
            end = int(rng[2]) if rng[1] and rng[2] else len(data) - 1
            if start >= len(data) and data:
                return self._send(416, b"", headers)
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers)
        self._send(200, data, headers)

    def _list(self, bucket, query):
        prefix, delim = query.get("prefix", ""), query.get("delimiter")
        start, end = query.get("startOffset"), query.get("endOffset")
        items, prefixes = [], set()
        with self.store.lock:
            objects = sorted((n, o) for (b, n), o in self.store.objects.items() if b == bucket)
        for name, (data, gen) in objects:
            if not name.startswith(prefix) or (start and name < start) or (end and name >= end):
                continue
            rest = name[len(prefix):]
            if delim and delim in rest:
                prefixes.add(prefix + rest[:rest.index(delim) + len(delim)])
            else:
                items.append(_resource(bucket, name, data, gen))
        self._send(200, {"kind": "storage#objects", "items": items,
                         "prefixes": sorted(prefixes)})

    def do_POST(self):
        path, query = self._route()
        m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
        if m:
            return self._upload(m[1], query)
        m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/(?:rewriteTo|copyTo)/b/([^/]+)/o/(.+)",
                         path)
        if m:
            self._body()
            with self.store.lock:
                obj = self.store.objects.get((m[1], unquote(m[2])))
            if obj is None:
                return self._not_found()
            code, res = self.store.put(m[3], unquote(m[4]), obj[0], query)
            if code != 200 or "/copyTo/" in path:
                return self._send(code, res)
            return self._send(200, {"kind": "storage#rewriteResponse", "done": True,
                                    "totalBytesRewritten": res["size"],
                                    "objectSize": res["size"], "resource": res})
        self._body()
        self._not_found()

    def _upload(self, bucket, query):
        kind = query.get("uploadType")
        body = self._body()
        if kind == "media":
            return self._send(*self.store.put(bucket, query["name"], body, query))
        if kind == "multipart":
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
            meta_part, data_part = list(msg.iter_parts())[:2]
            meta = json.loads(meta_part.get_payload(decode=True))
            return self._send(*self.store.put(bucket, meta.get("name") or query["name"],
                                              data_part.get_payload(decode=True), query))
        if kind == "resumable" and "upload_id" not in query:
            name = query.get("name") or json.loads(body or b"{}").get("name")
            with self.store.lock:
                upload_id = str(len(self.store.uploads) + 1)
                self.store.uploads[upload_id] = {"bucket": bucket, "name": name, "data": b"",
                                                 "query": query}
            location = (f"{self.base}/upload/storage/v1/b/{bucket}/o?uploadType=resumable"
                        f"&upload_id={upload_id}")
            return self._send(200, b"", {"Location": location})
        self._not_found()

    def do_PUT(self):
        path, query = self._route()
        body = self._body()
        upload = self.store.uploads.get(query.get("upload_id", ""))
        if upload is None:
            return self._not_found()
        upload["data"] += body
        m = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+|\*)",
                         self.headers.get("Content-Range", "bytes */*"))
        total = m[1] if m else "*"
        if total != "*" and len(upload["data"]) >= int(total):
            return self._send(*self.store.put(upload["bucket"], upload["name"], upload["data"],
                                              upload["query"]))
        headers = {"Range": f"bytes=0-{len(upload['data']) - 1}"} if upload["data"] else {}
        self._send(308, b"", headers)

    def do_DELETE(self):
        path, query = self._route()
        m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)
        if not m:
            return self._not_found()
        with self.store.lock:
            obj = self.store.objects.get((m[1], unquote(m[2])))
            if obj is None:
                return self._not_found()
            if not _preconditions_hold(obj, query):
                return self._send(412, {"error": {"code": 412}})
            del self.store.objects[(m[1], unquote(m[2]))]
        self._send(204)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


class FakeGCS:
    """The server, started on a free port of 127.0.0.1 and stopped by `close()`."""

    def __init__(self):
        self.store = _Store()
        self._tmp = tempfile.TemporaryDirectory(prefix="fake_gcs_")
        self.cert, key = _self_signed(self._tmp.name)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(self.cert, key)
        handler = type("Handler", (_Handler,), {"store": self.store, "tls": tls})
        self.server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.base = self.url
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def env(self) -> dict:
        """The environment variables that send every GCS client of a process here."""
        return {"TENSORSTORE_GCS_HTTP_URL": self.url, "STORAGE_EMULATOR_HOST": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token", "NO_GCE_CHECK": "true",
                "HTTPS_PROXY": self.url, "https_proxy": self.url, "CURL_CA_BUNDLE": self.cert,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "GOOGLE_CLOUD_PROJECT": "fake-project",
                # TensorFlow caches stats and listings for seconds by default; another
                # process's writes must be seen at once, as on GCS itself.
                "GCS_STAT_CACHE_MAX_AGE": "0", "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
                "GCS_READ_CACHE_MAX_SIZE_MB": "0"}

    def names(self, bucket: str) -> list[str]:
        with self.store.lock:
            return sorted(n for b, n in self.store.objects if b == bucket)

    def read(self, bucket: str, name: str) -> bytes:
        with self.store.lock:
            return self.store.objects[(bucket, name)][0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._tmp.cleanup()
