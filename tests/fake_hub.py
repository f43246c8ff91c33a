"""A local HTTP server in the Hugging Face hub's layout, for `npugate pull` tests (these
machines cannot reach the hub). It answers what huggingface_hub asks: model info with file
metadata (`/api/models/REPO[/revision/REV]?blobs=true`), and `HEAD`/`GET` on
`/REPO/resolve/REV/FILE` with the hub's headers (X-Repo-Commit, ETag, X-Linked-Etag,
X-Linked-Size) and byte ranges. It can drop a connection halfway through a file (the client
must resume) or serve bytes that differ from the digest it lists (the client must refuse).

Also here: a tiny GGUF writer (random llama weights under SmolLM2's real tokenizer), so a
GGUF pull is tested end to end without a large download."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

LFS_SUFFIXES = (".gguf", ".safetensors", ".onnx", ".onnx.data", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    license: str | None = "apache-2.0"
    sha: str = ""
    corrupt: set[str] = field(default_factory=set)  # served with a byte changed
    cut_once: set[str] = field(default_factory=set)  # the first GET stops halfway

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
        self.sha = self.sha or digest.hexdigest()

    def lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def served(self, name: str) -> bytes:
        data = self.files[name]
        if name in self.corrupt:
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub.handle(self, head=False)

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, req: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = req.path.split("?", 1)[0]
        self.requests.append((req.command, path, req.headers.get("Range")))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if info:
            repo = self.repos.get(info.group(1))
            if repo is None:
                return self._send(req, 404, b'{"error": "Repository not found"}',
                                  {"X-Error-Code": "RepoNotFound"}, head)
            body = {"id": info.group(1), "modelId": info.group(1), "sha": repo.sha,
                    "private": False, "tags": [], "downloads": 0, "likes": 0,
                    "cardData": {"license": repo.license} if repo.license else {},
                    "siblings": [
                        {"rfilename": name, "size": len(data),
                         "blobId": hashlib.sha1(data).hexdigest(),
                         **({"lfs": {"size": len(data), "sha256": hashlib.sha256(
                             data).hexdigest(), "pointerSize": 134}} if repo.lfs(name) else {})}
                        for name, data in sorted(repo.files.items())]}
            return self._send(req, 200, json.dumps(body).encode(),
                              {"Content-Type": "application/json"}, head)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = self.repos.get(resolve.group(1)) if resolve else None
        if resolve is None or repo is None or resolve.group(3) not in repo.files \
                or resolve.group(2) not in (repo.sha, "main"):
            return self._send(req, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
        name = resolve.group(3)
        data, listed = repo.served(name), repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "ETag": f'"{hashlib.sha1(listed).hexdigest()}"'}
        if repo.lfs(name):
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(listed).hexdigest()}"',
                        "X-Linked-Size": str(len(listed))}
        ranged = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range") or "")
        start = int(ranged.group(1)) if ranged else 0
        if head:
            return self._send(req, 200, data, headers, True)
        if name in repo.cut_once:  # promise the whole file, send half, hang up
            repo.cut_once.discard(name)
            req.send_response(200)
            for k, v in headers.items():
                req.send_header(k, v)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data[: len(data) // 2])
            req.wfile.flush()
            req.close_connection = True
            return None
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(req, 206, data[start:], headers, False)
        return self._send(req, 200, data, headers, False)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str],
              head: bool) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under `folder`, by its path in a repository (under `prefix`)."""
    return {prefix + str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_gguf(source: Path, out: Path, seed: int = 0) -> None:
    """A GGUF with `source`'s tokenizer and metadata and random tiny llama weights (2 layers,
    hidden 128), in F32: what a GGUF on the hub looks like, in 27 MB (over two of
    huggingface_hub's 10 MB download chunks, so a cut halfway leaves one on disk to resume
    from)."""
    import gguf

    reader = gguf.GGUFReader(source)
    vocab = int(reader.fields["llama.vocab_size"].contents())
    hidden, layers, heads, kv_heads, ff = 128, 2, 4, 2, 256
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(out, "llama")
    sizes = {"llama.block_count": layers, "llama.embedding_length": hidden,
             "llama.feed_forward_length": ff, "llama.attention.head_count": heads,
             "llama.attention.head_count_kv": kv_heads, "llama.rope.dimension_count": head_dim,
             "llama.context_length": 2048}
    for name, value in sizes.items():
        writer.add_uint32(name, value)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in sizes or name in (
                "general.architecture", "general.file_type", "general.quantization_version"):
            continue
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), kind, sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer.add_tensor("token_embd.weight", weights(vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(ff, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(ff, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(hidden, ff))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
