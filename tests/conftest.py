"""Test settings: a private PREFECT_HOME, no analytics, and one Prefect test server per session."""

import os
import signal
import tempfile

# A suite started in the background by a script (`bash .ci/run &`, nohup) inherits an ignored
# SIGINT, and so does every process it starts. `prefect worker start` stops on SIGTERM by sending
# itself SIGINT, so with SIGINT ignored it never stops. Give the suite a terminal's SIGINT; the
# processes it starts then get the default one.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_home = tempfile.mkdtemp(prefix="ptqflow-prefect-")
os.environ["PREFECT_HOME"] = _home
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server():
    """A real (ephemeral, SQLite) Prefect server shared by the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """An S3-compatible server (moto) on loopback, with s3fs pointed at it."""
    import urllib.request

    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in the process, across servers: start empty
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", b""))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("models")
    yield fs
    fsspec.filesystem("s3").clear_instance_cache()
    server.stop()
