"""Rehearse a Streamlit Community Cloud deployment here: a fresh virtual environment from the
deployment requirements only, `streamlit run app.py` from it (in a copy of the repository's files,
as a clone has them) under a memory limit, and several browser sessions at once touring every page
in headless Chromium. Prints the server's peak RSS.

    python benchmarks/cloud_rehearsal.py                 # 4 sessions x 2 tours, 800 MiB limit, fresh venv
    python benchmarks/cloud_rehearsal.py --sessions 8 --keep-venv /tmp/cloud-venv   # then --reuse-venv

The limit is an RSS watchdog: the kernel's high-water mark of the server's resident memory (VmHWM,
which no sampling gap can miss) is read every 0.2 s and the server is killed, and the rehearsal
fails, once it passes the limit. (An address-space limit, `prlimit --as`, does not model Cloud:
torch reserves far more virtual memory than it touches.)

Cloud installs requirements-cloud.txt (through environment.yml): PyTorch's CPU index first. Where
that index cannot be reached (this machine reaches package registries only through pip's configured
mirror), the index line is left out and pip takes torch 2.13.0+cpu from its configured wheels; the
script says which it did. The driver (Playwright) runs in this interpreter, not in the new venv.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REQUIREMENTS = ROOT / "requirements-cloud.txt"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def reachable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def make_venv(folder: Path) -> Path:
    """A fresh venv with only the deployment requirements; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    python = folder / "bin" / "python"
    requirements = REQUIREMENTS
    if not reachable("download.pytorch.org"):
        lines = [line for line in REQUIREMENTS.read_text().splitlines() if TORCH_INDEX not in line]
        requirements = folder / "requirements-cloud-local.txt"
        requirements.write_text("\n".join(lines).replace("-r requirements.txt", f"-r {ROOT / 'requirements.txt'}") + "\n")
        log(f"{TORCH_INDEX} is not reachable here: installing {REQUIREMENTS.name} without its index line "
            "(torch 2.13.0+cpu from pip's configured wheels)")
    started = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True, cwd=ROOT)
    log(f"installed {REQUIREMENTS.name} in {time.perf_counter() - started:.0f} s")
    check = ("import torch, streamlit, nnsight, transformers; "
             "assert torch.version.cuda is None, 'a CUDA build of torch was installed'; "
             "print(torch.__version__, streamlit.__version__, nnsight.__version__, transformers.__version__)")
    versions = subprocess.run([str(python), "-c", check], check=True, capture_output=True, text=True).stdout.split()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 2 ** 20
    log(f"venv: torch {versions[0]} (CPU only), streamlit {versions[1]}, nnsight {versions[2]}, "
        f"transformers {versions[3]}; {size:.0f} MiB on disk")
    return python


def memory(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Watchdog(threading.Thread):
    """Kills the server once its peak RSS passes `limit_mb`; remembers the peak."""

    def __init__(self, proc: subprocess.Popen, limit_mb: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.limit_mb, self.peak, self.exceeded = proc, limit_mb, 0.0, False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.proc.poll() is None:
            try:
                self.peak = max(self.peak, memory(self.proc.pid)[1])
            except (OSError, KeyError):
                break
            if self.peak > self.limit_mb:
                self.exceeded = True
                self.proc.kill()
                break
            time.sleep(0.2)


def snapshot(folder: Path) -> Path:
    """A copy of the repository's files as a clone would have them (tracked and not ignored), so that
    edits made while the rehearsal runs do not reach the server (Streamlit reloads changed modules)."""
    import shutil
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def serve(python: Path, port: int, cache: Path, repo: Path) -> subprocess.Popen:
    # As Cloud does: `streamlit run app.py` from the repository root (it reads .streamlit/config.toml there).
    cmd = [str(python), "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
           "--server.address", "127.0.0.1"]
    out = open(cache / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIRCUIT_EXPLORER_", "PYTHON"))}
    env["CIRCUIT_EXPLORER_CACHE"] = str(cache)   # a new container: nothing cached, nothing prepared
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited before it became healthy")
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


class ServerDied(RuntimeError):
    pass


def settle_or_fail(page, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for the page's run to end, failing at once if the server process has gone."""
    from tests.browser import problems, settle
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerDied(f"the server exited with status {proc.returncode}"
                             + (" (SIGSEGV)" if proc.returncode == -11 else " (SIGKILL)" if proc.returncode == -9 else ""))
        try:
            settle(page, timeout=10)
            return
        except TimeoutError:
            if problems(page):   # an exception ended the run before the sidebar links were drawn
                return
            if time.time() > deadline:
                raise


def tour(base: str, sessions: int, rounds: int, proc: subprocess.Popen) -> list[str]:
    """Every session opens the app (Home), then all of them visit every other sidebar page in turn
    (each click in all sessions first, then each waits for its run), `rounds` times. Returns the
    problems seen."""
    from explorer.surfaces.ui.widgets import PAGES
    from tests.browser import chromium, new_page, problems, sidebar_links
    found = []
    with chromium() as browser:
        pages = [new_page(browser) for _ in range(sessions)]
        for page in pages:
            page.goto(base, wait_until="domcontentloaded")
        for page in pages:
            settle_or_fail(page, proc)
        labels = [label for _, label, _, _ in PAGES]
        log(f"{sessions} sessions open; pages: {', '.join(labels)}")
        for round_no in range(rounds):
            if round_no:   # back Home by the address bar: the Story page, last, hides the sidebar
                for page in pages:
                    page.goto(base, wait_until="domcontentloaded")
                for page in pages:
                    settle_or_fail(page, proc)
            for label in labels[1:]:
                # A link's text is its icon's ligature name, then its label.
                name = re.compile(rf"{re.escape(label)}\s*$")
                for page in pages:
                    sidebar_links(page).filter(has_text=name).first.click()
                for i, page in enumerate(pages):
                    settle_or_fail(page, proc)
                    found += [f"session {i}, {label}: {p}" for p in problems(page)]
                rss, peak = memory(proc.pid)
                log(f"round {round_no + 1}, {label:<12} RSS {rss:6.0f} MiB, peak {peak:6.0f} MiB")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit-mb", type=float, default=800)
    parser.add_argument("--keep-venv", type=Path, help="build the venv here and keep it (default: a temporary one)")
    parser.add_argument("--reuse-venv", action="store_true", help="use the --keep-venv folder as it is")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cloud-rehearsal-"))
    folder = args.keep_venv or work / "venv"
    python = folder / "bin" / "python" if args.reuse_venv else make_venv(folder)
    cache = work / "cache"
    cache.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    repo = snapshot(work / "repo")
    proc = serve(python, port, cache, repo)
    dog = Watchdog(proc, args.limit_mb)
    dog.start()
    problems_seen, error = [], None
    try:
        wait_healthy(base, proc)
        log(f"server up at {base} (pid {proc.pid}), RSS {memory(proc.pid)[0]:.0f} MiB")
        problems_seen = tour(base, args.sessions, args.rounds, proc)
    except Exception as exc:   # the watchdog's kill surfaces here as a browser or connection error
        error = exc
    finally:
        try:
            dog.peak = max(dog.peak, memory(proc.pid)[1])
        except OSError:
            pass
        dog.done.set()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    print()
    print(f"peak RSS of the app server: {dog.peak:.0f} MiB (limit {args.limit_mb:.0f} MiB), "
          f"{args.sessions} sessions x {args.rounds} round(s) of every page")
    if dog.exceeded:
        print(f"FAIL: the server passed {args.limit_mb:.0f} MiB and was killed")
    if error is not None and not dog.exceeded:
        print(f"FAIL: {type(error).__name__}: {error}")
        print((cache / "server.log").read_text()[-3000:])
    print(f"server log: {cache / 'server.log'}")
    for p in problems_seen:
        print("FAIL:", p)
    ok = not dog.exceeded and error is None and not problems_seen
    print("PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
