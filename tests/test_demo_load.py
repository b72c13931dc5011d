"""Load test of ``vlm-guard demo`` (issue 17): 10 clients, 100 requests, loopback only, stops by itself.

The server is the real command on the shipped default model, in a subprocess on a free loopback port.
Each request is a new browser session (a ``gradio_client.Client``): it uploads a bundled example (or,
one time in ten, a corrupt file) and presses Generate with a caption prompt or a yes/no question
(one-token answers included). Two batches of 50 sessions; the server's resident memory after the
second batch must be within 10 % of after the first, every request must be answered (both answers
arrive) or refused with a message, refused uploads must leave no file behind, and the server's
temporary folder must be gone once it stops (the sweep of old files while it runs is tested in
``test_demo.py::test_app_sweeps_its_temporary_files``).

Run: ``pytest tests/test_demo_load.py`` (about two minutes on two busy CPU cores).
"""

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 10
BATCH = 50  # sessions (requests) per batch; two batches
STARTUP_SECONDS = 120
REQUEST_SECONDS = 120
MAX_SESSIONS = 30  # fewer than the 100 sessions made: the oldest are dropped
SESSION_TTL = 120  # longer than any wait in the queue (a session's image must not expire while it waits)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture()
def server(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    port = free_port()
    temp_parent = tmp_path / "gradio"
    command = [
        sys.executable,
        "-m",
        "vlm_guard.cli",
        "demo",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-new-tokens",
        "8",
        "--max-sessions",
        str(MAX_SESSIONS),
        "--session-ttl",
        str(SESSION_TTL),
    ]
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "GRADIO_TEMP_DIR": str(temp_parent),
        "OMP_NUM_THREADS": "2",
    }
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    info = {"url": url, "process": process, "temp_parent": temp_parent, "log": log_path}
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the demo did not answer on {url} within {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield info
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _methods():
    # (on, strength) per method in the page's order: VHR, VAR, GIFT, PAI, VCD
    return [True, 2.0, False, 0.6, True, 5.0, False, 0.2, False, 0.5]


def one_session(url: str, number: int, example: Path, corrupt: Path) -> dict:
    """One new session: upload, then Generate. Returns what came back (or the error message)."""
    from gradio_client import Client, handle_file

    rng = random.Random(number)
    bad = number % 10 == 3
    prompt, tokens = rng.choice([("describe the image", 6), ("is there a house ?", 1), ("is there a tree ?", 3)])
    outcome = {"number": number, "bad": bad, "tokens": tokens}
    client = None
    try:
        client = Client(url, verbose=False, download_files=False)
        uploaded = client.predict(handle_file(str(corrupt if bad else example)), api_name="/on_upload")
        outcome["upload_status"] = uploaded[-2]  # (..., status, upload box)
        generated = client.predict(prompt, tokens, *_methods(), api_name="/on_generate")
        outcome["status"] = generated[-1]
        outcome["plain"], outcome["guarded"] = generated[1], generated[3]
    except Exception as error:  # a refusal must still carry a message
        outcome["error"] = f"{type(error).__name__}: {error}"
    finally:
        if client is not None:
            client.close()  # the tab is closed: its heartbeat stream ends
    return outcome


def run_batch(url: str, start: int, example: Path, corrupt: Path) -> list[dict]:
    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda n: one_session(url, n, example, corrupt), range(start, start + BATCH)))


def check(outcome: dict) -> None:
    if outcome["bad"]:
        assert outcome.get("upload_status", "").startswith("**Upload refused:**"), outcome
        assert outcome.get("status", "").startswith("**Input refused:** No image"), outcome
        assert outcome["plain"] == [] and outcome["guarded"] == [], outcome
        return
    if "error" in outcome:  # refused by the server (e.g. a full queue): the message must say so
        assert len(outcome["error"].split(":", 1)[-1].strip()) > 10, outcome
        return
    assert outcome["status"].startswith("**Done.**"), outcome
    for answer in ("plain", "guarded"):
        assert 1 <= len(outcome[answer]) <= outcome["tokens"], outcome  # the answer arrived, one-token ones too


def test_demo_under_load(server, tmp_path):
    from vlm_guard.demo.inputs import load_examples

    example = load_examples()[0].path
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not image data" * 40)
    pid = server["process"].pid

    first = run_batch(server["url"], 0, example, corrupt)
    after_first = resident_mb(pid)
    second = run_batch(server["url"], BATCH, example, corrupt)
    after_second = resident_mb(pid)
    outcomes = first + second
    for outcome in outcomes:
        check(outcome)
    answered = sum(1 for o in outcomes if not o["bad"] and "error" not in o)
    refused = [o for o in outcomes if o["bad"] or "error" in o]
    print(
        f"\n{len(outcomes)} requests: {answered} answered, {len(refused)} refused with a message; "
        f"server memory {after_first:.0f} MB after the first batch, {after_second:.0f} MB after the second"
    )
    assert answered >= 80, f"only {answered} of {len(outcomes)} requests were answered"
    assert after_second <= 1.10 * after_first, (after_first, after_second)

    owned = list(server["temp_parent"].glob("vlm-guard-demo-*"))
    assert len(owned) == 1, owned
    assert not list(owned[0].rglob("corrupt.png")), "a refused upload was left in the temporary folder"
    server["process"].send_signal(signal.SIGTERM)
    server["process"].wait(timeout=60)
    assert not owned[0].exists(), "the demo's temporary folder outlived the server"
