"""Run `transformers serve` on an exported folder in a process of its own, on 127.0.0.1, and stop it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import goat_hf

# The folder holding the goat_hf under test: the server must import this one, not another installed copy.
SOURCE_ROOT = Path(goat_hf.__file__).resolve().parent.parent


# uvicorn says where it listens: with --port 0 the OS picks a free port as the server binds it (a port probed free
# beforehand can be taken by another process before the server binds it)
LISTENING = re.compile(rb"Uvicorn running on (http://127\.0\.0\.1:[1-9]\d*)")


@contextlib.contextmanager
def transformers_serve(folder: Path, work: Path, startup_s: float = 240) -> Iterator[str]:
    """Serve `folder` (its model preloaded) with the CLI as a user runs it; yields the base URL. Its log goes to
    `work`/serve.log, shown when it fails to start. The server and the model's process it spawns are stopped."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_MODULES_CACHE": str(work / "modules"),  # where trust_remote_code copies goat_modeling.py
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--trust-remote-code"]
    command += ["--host", "127.0.0.1", "--port", "0"]
    log_path = work / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield _wait_until_healthy(server, startup_s, log_path)
    finally:
        _stop(server)


def _wait_until_healthy(server: subprocess.Popen, startup_s: float, log_path: Path) -> str:
    """The server's URL once its log says where it listens and /health answers ok."""
    deadline, url = time.monotonic() + startup_s, None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"transformers serve exited ({server.returncode}):\n{log_path.read_text()[-4000:]}")
        if url is None and (listening := LISTENING.search(log_path.read_bytes())):
            url = listening[1].decode()
        if url is not None:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if json.loads(response.read()).get("status") == "ok":
                    return url
        time.sleep(0.5)
    raise RuntimeError(f"transformers serve did not start in {startup_s:.0f} s:\n{log_path.read_text()[-4000:]}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down and stops the model's process), then SIGKILL what is left of its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def post(url: str, path: str, body: bytes | dict) -> tuple[int, str]:
    """POST raw bytes or a JSON object; returns the status and the body as text, whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
