"""Deployment Engine: the unchanged app on a real `flower-superlink` and `flower-supernode`s.

Every process runs on loopback with its own ports and a private FLWR_HOME, each in its own process
group; the test stops all of them and checks that none (nor anything they spawned) survives.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flower_p2p.results import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_config(values: dict) -> str:
    """`--run-config` string: strings quoted, the rest as TOML literals."""

    def lit(v):
        if isinstance(v, bool):
            return str(v).lower()
        return f"'{v}'" if isinstance(v, str) else str(v)

    return " ".join(f"{k}={lit(v)}" for k, v in values.items())


class Federation:
    """Starts SuperLink, SuperNodes and `flwr` commands; stops them all, children included."""

    def __init__(self, tmp_path: Path, tls: Path | None = None) -> None:
        self.dir = tmp_path
        self.home = tmp_path / "flwr-home"
        self.home.mkdir(parents=True)
        self.port = _free_port()
        self.tls = tls  # folder with ca.crt, server.pem, server.key; None = insecure
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            MPLBACKEND="Agg",
            # one torch thread per node process, as Ray gives each simulated node one CPU: the
            # same float operations in the same order, so the same numbers as the simulation
            OMP_NUM_THREADS="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        # The connection `flwr run . test` and `flwr supernode ...` use (FLWR_HOME/config.toml).
        link = f'address = "127.0.0.1:{self.port}"\n' + (
            f'root-certificates = "{tls / "ca.crt"}"\n' if tls else "insecure = true\n"
        )
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n{link}'
        )

    def tls_args(self) -> list[str]:
        """Flags of a SuperNode that verifies the SuperLink's certificate (or --insecure)."""
        return ["--root-certificates", str(self.tls / "ca.crt")] if self.tls else ["--insecure"]

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start a command in its own process group; stdout and stderr go to `<name>.log`."""
        with open(self.dir / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        self.seen[proc.pid] = psutil.Process(proc.pid)
        return proc

    def log(self, name: str) -> str:
        """What a started command has printed so far."""
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run one `flwr` CLI command against this federation's SuperLink."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )

    def start_superlink(self, *extra: str) -> None:
        """One SuperLink: Fleet, Control and Runtime APIs on one port; wait until it listens."""
        tls = (
            ["--ssl-ca-certfile", str(self.tls / "ca.crt"),
             "--ssl-certfile", str(self.tls / "server.pem"),
             "--ssl-keyfile", str(self.tls / "server.key")]
            if self.tls else ["--insecure"]
        )  # fmt: skip
        proc = self.start(
            "superlink",
            "flower-superlink",
            *tls,
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
            *extra,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log("superlink")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise AssertionError("SuperLink did not listen within 60 s\n" + self.log("superlink"))

    def start_supernode(self, name: str, pid: int, num: int, *extra: str) -> subprocess.Popen:
        """One SuperNode holding partition ``pid`` of ``num``; its own Runtime API port."""
        return self.start(
            name,
            "flower-supernode",
            *self.tls_args(),
            "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(_free_port()),
            "--node-config", f"partition-id={pid} num-partitions={num}",
            *extra,
        )  # fmt: skip

    def nodes(self) -> list[dict]:
        """The SuperLink's list of SuperNodes (`flwr supernode ls`), whatever their status."""
        out = self.flwr("supernode", "ls", "test", "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout[out.stdout.index("{") :])["nodes"]

    def online_nodes(self) -> list[dict]:
        """The SuperNodes the SuperLink lists as online."""
        return [n for n in self.nodes() if n["status"] == "online"]

    def wait_online(self, n: int, timeout: float = 120) -> list[dict]:
        """Wait until ``n`` SuperNodes are online (the ServerApp waits only NODE_WAIT_S)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(nodes := self.online_nodes()) >= n:
                return nodes
            time.sleep(1)
        logs = "\n".join(self.log(k)[-1500:] for k in self.procs)
        raise AssertionError(f"{n} SuperNodes not online within {timeout} s\n{logs}")

    def run_app(self, run_config: dict, timeout: float = 600) -> str:
        """`flwr run . test --run-config ... --stream`; returns its output once the run ended."""
        proc = self.start("flwr-run", "flwr", "run", ".", "test",
                          "--run-config", _run_config(run_config), "--stream")  # fmt: skip
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"flwr run did not end within {timeout} s\n{self.log('flwr-run')[-3000:]}")
        out = self.log("flwr-run")
        assert proc.returncode == 0, out[-3000:]
        return out

    def _ours(self) -> list[psutil.Process]:
        """Every live process we started, anything they spawned, and anything in our FLWR_HOME."""
        found: dict[int, psutil.Process] = {}
        for proc in list(self.seen.values()):
            try:
                if proc.is_running():
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        for proc in psutil.process_iter(["environ"]):
            try:
                if (proc.info["environ"] or {}).get("FLWR_HOME") == str(self.home):
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        # Spawned processes (superexec, serverapp, clientapp) are checked afterwards too.
        self.seen.update(found)
        return [p for p in found.values() if _alive(p)]

    def stop(self) -> list[str]:
        """SIGTERM every process group, then SIGKILL what is left; returns the survivors."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            procs = self._ours()
            if not procs:
                break
            for popen in self.procs.values():  # each started command's whole group
                try:
                    os.killpg(popen.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            for proc in procs:  # and what detached itself into a group of its own
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=grace)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)  # reap our direct children
            except subprocess.TimeoutExpired:
                pass
        return [f"{p.pid} {p.name()}" for p in self.seen.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture()
def federation(tmp_path):
    """A Federation factory; whatever happens, every started process is stopped afterwards."""
    made: list[Federation] = []

    def make(tls: Path | None = None) -> Federation:
        made.append(Federation(tmp_path / f"fed{len(made)}", tls))
        return made[-1]

    yield make
    survivors = [s for fed in made for s in fed.stop()]
    assert not survivors, f"processes left behind: {survivors}"


# --- TLS material for the test: a CA, a server certificate for loopback, SuperNode keys ---------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_tls(folder: Path) -> Path:
    """ca.crt, server.pem/server.key (SAN localhost, 127.0.0.1), valid for one day."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=1))  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder(
            subject_name=_name("flower-p2p test CA"),
            issuer_name=_name("flower-p2p test CA"),
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )  # fmt: skip
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder(
            subject_name=_name("localhost"),
            issuer_name=ca.subject,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )  # fmt: skip
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder


def _make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's auth key pair in OpenSSH format (NIST P-384, what Flower accepts)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    private.chmod(0o600)
    return private, public


# --- the tests -----------------------------------------------------------------------------------


def _assert_metrics(out: Path, nodes: int, rounds: int) -> list[dict]:
    metrics = read_jsonl(out / "metrics.jsonl")
    assert sorted((m["round"], m["node"]) for m in metrics) == [
        (r, n) for r in range(rounds + 1) for n in range(nodes)
    ]
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_nodes"] == nodes and summary["num_rounds"] == rounds
    return metrics


def test_real_superlink_three_supernodes_tls_and_auth(federation, tmp_path, tiny_sim_run):
    """TLS and SuperNode auth on: 3 registered SuperNodes join and run `flwr run` for 2 rounds,
    with the simulation engine's numbers; an unregistered key and no key are refused.

    One federation checks both (each costs about two minutes of start-up on 2 cores).
    """
    sim_out, run_config = tiny_sim_run
    tls = _make_tls(tmp_path / "certs")
    keys = [_make_node_key(tls, f"node{p}") for p in range(3)]
    rogue_key, _ = _make_node_key(tls, "rogue")  # never registered
    fed = federation(tls)
    fed.start_superlink("--enable-supernode-auth")
    registered = set()
    for _, public in keys:
        reg = fed.flwr("supernode", "register", str(public), "test", "--format", "json")
        assert reg.returncode == 0, reg.stdout + reg.stderr
        registered.add(str(json.loads(reg.stdout[reg.stdout.index("{") :])["node-id"]))
    # Identical command lines apart from the key: only the key decides. Partition ids come
    # through each SuperNode's node config.
    for p, (private, _) in enumerate(keys):
        fed.start_supernode(f"supernode{p}", p, 3, "--auth-supernode-private-key", str(private))
    rogue = fed.start_supernode("rogue", 1, 3, "--auth-supernode-private-key", str(rogue_key))
    # Without a key a SuperNode registers itself: what SuperNode authentication forbids.
    keyless = fed.start_supernode("keyless", 1, 3)
    online = fed.wait_online(3)
    assert rogue.wait(timeout=120) != 0, fed.log("rogue")
    assert "Failed to activate SuperNode" in fed.log("rogue")
    assert "No SuperNode found with the given public key" in fed.log("superlink")
    assert keyless.wait(timeout=120) != 0, fed.log("keyless")
    assert "All SuperNodes must be registered via the CLI" in fed.log("keyless")
    out = tmp_path / "results"
    log = fed.run_app({**run_config, "out-dir": str(out)})
    assert "round 2/2" in log  # the relay's progress, streamed back by `flwr run`
    metrics = _assert_metrics(out, nodes=3, rounds=2)
    # The same app and config in the simulation engine: the same training, number for number,
    # byte for byte (same config and seed, same metrics.jsonl, whichever engine runs it).
    assert metrics == read_jsonl(sim_out / "metrics.jsonl")
    assert (out / "metrics.jsonl").read_bytes() == (sim_out / "metrics.jsonl").read_bytes()
    assert f"running on https://127.0.0.1:{fed.port}" in fed.log("superlink")  # TLS, not HTTP
    # Each SuperNode ran its ClientApp for its own partition (who it is, the experiment's
    # config, 2 train, 1 evaluate).
    for p in range(3):
        assert fed.log(f"supernode{p}").count("Start `flwr-clientapp` process") == 5
    # mode=async through the same federation: with equal speeds and no latency its schedule is
    # the sync one, so it must compute the sync run's numbers (its loop sends other waves).
    # With two graph nodes on SuperNode 0 (nodes-per-supernode=2: one message for both, each with
    # its own Context in the SuperNode's state), node 2 on SuperNode 1, SuperNode 2 idle.
    async_out = tmp_path / "results-async"
    fed.run_app({**run_config, "mode": "async", "nodes-per-supernode": 2,
                 "out-dir": str(async_out)})  # fmt: skip
    shared = ("round", "node", "sim_time", "accuracy", "loss", "train_loss", "bytes_sent")
    assert [{k: m[k] for k in shared} for m in _assert_metrics(async_out, nodes=3, rounds=2)] == [
        {k: m[k] for k in shared} for m in metrics
    ]
    assert all(
        m["activations"] == (m["round"] > 0) for m in read_jsonl(async_out / "metrics.jsonl")
    )
    # Only the three registered SuperNodes ever were nodes of this SuperLink, and they were online.
    assert {n["node-id"] for n in online} == registered
    assert {n["node-id"] for n in fed.nodes()} == registered
    survivors = fed.stop()
    assert not survivors, f"processes left behind: {survivors}"
