"""The README's examples, run as written.

Every fenced ```python block and every command line of every ```sh block in README.md is picked up
here, so a new example is covered automatically: each line is either RUN (`runner_of` names how)
or listed in `NOT_RUN` with the reason; a line that is neither fails `test_every_example_is_run_or_excused`.

How lines run (from the repo root, PATH with the venv's bin first, as an activated `.venv` has it):
- python blocks: `python -c BLOCK` in a subprocess, with a timeout;
- `moeshard ...`: the venv's console script, through bash, exactly as written, plus what `APPENDED`
  adds to a line (and says why);
- `make run`: the Makefile's recipe with VENV pointing at wrappers of the venv's console script (the
  set-up step, creating and installing a venv, is not run: it would reinstall the shared venv);
- the multi-node harness lines: on one real harness cluster (network namespaces and cgroups; this
  machine is root), `<id>` and `198.18.K.2` filled from the live cluster, always brought down;
- the Ray-cluster block: `ray get-auth-token --generate` in a temp HOME, a private local head
  (tests/rayhead.py) using that token, and the README's `ray job submit` with `/data/pydoc-moe`
  replaced by the absolute models/pydoc-moe path and the jobs server's address by the head's own port.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rayhead import REPO, private_head

pytestmark = pytest.mark.slow

README = REPO / "README.md"
MODEL = REPO / "models" / "pydoc-moe"
VENV_BIN = Path(sys.executable).parent

# Lines that are not run, each with its reason (keys: the line's words, comments dropped).
NOT_RUN = {
    "make test": "runs the whole suite, this module included (it would run itself recursively)",
    "ray up ray_config.yaml": "needs a cloud provider (AWS); ray_config.yaml is checked by tests/test_ray_config.py",
    "ray dashboard ray_config.yaml &": "forwards the jobs server of the `ray up` cluster; here the private "
                                       "head's jobs server is reached directly",
    "serve deploy serve_config.yaml --address http://127.0.0.1:8265": "needs the `ray up` cluster's nodes (the "
        "config's paths are theirs); tests/test_serve_ray.py checks serve_config.yaml against Ray Serve's schema "
        "and builds its application",
}

# What is added to a line before it runs, and why.
APPENDED = {
    "moeshard bench --scenario 1": ("--tiny --quick --no-fetch --out {out}",
                                    "the full scenario takes many minutes; this runs the same code on the tiny "
                                    "checkpoint and writes the results to a temp dir; tests never download "
                                    "(llama.cpp's converter)"),
    "moeshard harness down": ("--cluster-id {cluster_id}",
                              "the README's `--cluster-id ID` form: a plain `down` also removes other users' "
                              "CLI-started clusters on a shared machine"),
    "make run": ("ARGS='--heatmap {out}/expert_heatmap.png'", "keeps the heatmap out of the repo"),
}


@dataclass(frozen=True)
class Line:
    block: int          # index of the ```sh block in the README
    lineno: int         # README line where the command starts
    text: str           # the line as written (continuations joined, trailing comment kept)

    @property
    def key(self) -> str:
        return " ".join(shlex.split(self.text, comments=True))

    @property
    def command(self) -> str:
        """The text without its trailing comment (so that words can be appended)."""
        quote = None
        for i, ch in enumerate(self.text):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (i == 0 or self.text[i - 1].isspace()):
                return self.text[:i].rstrip()
        return self.text

    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced block of `lang` in the README."""
    out, text = [], README.read_text()
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S):
        out.append((text[:m.start(1)].count("\n") + 1, m.group(1)))
    return out


def readme_lines() -> list[Line]:
    lines = []
    for b, (first, body) in enumerate(_blocks("sh")):
        pending, start = "", 0
        for i, raw in enumerate(body.splitlines()):
            if not pending:
                start = first + i
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            text, pending = (pending + raw).strip(), ""
            if shlex.split(text, comments=True):     # not blank, not a comment
                lines.append(Line(b, start, text))
    return lines


def runner_of(line: Line) -> str | None:
    """Which test runs this line (None: not run)."""
    w = line.words()
    if w[:2] == ["moeshard", "serve"] or w[0] == "curl":
        return "serve"
    if w[:2] == ["make", "run"]:
        return "make_run"
    if w[:2] == ["moeshard", "harness"] or w[:2] == ["ip", "netns"]:
        return "harness"
    if w[0] == "moeshard":
        return "moeshard"
    if w[:2] in (["ray", "get-auth-token"], ["ray", "job"]) or w[0] == "export":
        return "ray_cluster"
    return None


def _with_appended(line: Line, **values) -> str:
    extra = APPENDED.get(line.key)
    return line.command if extra is None else f"{line.command} {extra[0].format(**values)}"


def _env(**extra) -> dict:
    """Our environment as a newcomer's activated venv has it: the venv's bin first, no RAY_* from the suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _sh(cmd: str, timeout: float, env: dict | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    shown = "(output not shown)" if quiet else f"{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    print(f"\n$ {cmd}\n[rc {proc.returncode}]\n{shown}")
    return proc


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _lines_of(runner: str) -> list[Line]:
    seen, out = set(), []
    for line in readme_lines():
        if runner_of(line) == runner and line.key not in seen:   # a line shown twice runs once
            seen.add(line.key)
            out.append(line)
    return out


# ---- every example is accounted for -----------------------------------------------------------------

def test_every_example_is_run_or_excused():
    lines = readme_lines()
    assert len(lines) >= 10 and _blocks("python"), "the README's examples were not found"
    orphans = [f"README.md:{l.lineno}: {l.text}" for l in lines if runner_of(l) is None and l.key not in NOT_RUN]
    assert not orphans, ("README lines neither run by tests/test_readme.py nor in its NOT_RUN table "
                         "(give each a runner or a reason): " + "; ".join(orphans))
    keys = {l.key for l in lines}
    stale = [k for k in list(NOT_RUN) + list(APPENDED) if k not in keys]
    assert not stale, f"tests/test_readme.py names lines the README no longer has: {stale}"


# ---- python blocks ------------------------------------------------------------------------------------

SERVED = "http://127.0.0.1:8000"          # python blocks talking to this run against `moeshard serve`
_PLAIN = [(n, code) for n, code in _blocks("python") if SERVED not in code]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("first,code", _PLAIN, ids=[f"README.md:{n}" for n, _ in _PLAIN])
def test_python_block_runs_as_written(first, code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=360)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, f"README.md:{first}: python block failed:\n{proc.stderr[-3000:]}"


# ---- moeshard lines ---------------------------------------------------------------------------------------

# A generation's stats: the throughput line and the per-actor table, actor 1 holding half of the 32 experts.
GENERATED = [r"generated \d+ tokens in", r"(?m)^actor\s+node\s+experts", r"(?m)^\s*1\s+\S+\s+16\s"]
# What each sub-command's output must show; a sub-command not listed must at least exit 0 and print something.
EXPECT = {
    "generate": GENERATED,
    "plan": [r"2 actor\(s\), memory budget per actor: 8 MB,", r"(?m)^\s+1\s+16\s"],
    "bench": [r"(?m)^results: .*\.json$", r"(?m)^\| 1 \| in memory, 2 workers"],
}


def _producer_of(line: Line) -> Line | None:
    """The README's `moeshard quantize SRC DST` line whose DST this line's checkpoint argument is, if any."""
    words = line.words()
    for other in _lines_of("moeshard"):
        w = other.words()
        if other != line and w[1] == "quantize" and len(w) > 3 and len(words) > 2 and w[3] == words[2]:
            return other
    return None


@pytest.mark.timeout(900)
@pytest.mark.parametrize("line", _lines_of("moeshard"), ids=lambda l: l.key)
def test_moeshard_line_runs(line, tmp_path):
    made_by = _producer_of(line)
    if made_by is not None:     # e.g. `eval` of the copy a `quantize` line writes: that line runs first, so
        _ok(_sh(_with_appended(made_by, out=tmp_path / "pre"), timeout=840))   # any order (or alone) works
    out = _ok(_sh(_with_appended(line, out=tmp_path / "out"), timeout=840))
    sub = line.words()[1]
    assert out.strip(), f"`{line.text}` printed nothing"
    for pattern in EXPECT.get(sub, []):
        assert re.search(pattern, out), f"`{line.text}`: no {pattern!r} in its output:\n{out[-3000:]}"
    if sub == "bench":
        assert any((tmp_path / "out").rglob("*.json")), f"bench wrote no JSON results: {list(tmp_path.rglob('*'))}"


# ---- make run ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_make_run(tmp_path):
    (line,) = _lines_of("make_run")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "moeshard").write_text(f'#!/bin/sh\nexec {shlex.quote(str(VENV_BIN / "moeshard"))} "$@"\n')
    # The recipe only runs `bin/moeshard`; a `python` that refuses makes any attempt at set-up fail loudly
    # instead of reinstalling the shared venv.
    (venv / "bin" / "python").write_text("#!/bin/sh\necho 'test_readme: the set-up step must not run' >&2\nexit 1\n")
    for f in (venv / "bin").iterdir():
        f.chmod(0o755)
    (venv / ".installed").touch()     # newer than pyproject.toml: the set-up target is up to date
    out = _ok(_sh(f"{_with_appended(line, out=tmp_path)} VENV={shlex.quote(str(venv))}", timeout=540))
    for pattern in GENERATED:
        assert re.search(pattern, out), f"`make run`: no {pattern!r} in its output:\n{out[-3000:]}"
    assert f"heatmap written to {tmp_path}/expert_heatmap.png" in out and (tmp_path / "expert_heatmap.png").exists()


# ---- the multi-node harness --------------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_harness_lines_on_a_real_cluster(tmp_path):
    # `down` is shown before the job line that needs the cluster: it runs last.
    lines = sorted(_lines_of("harness"), key=lambda l: l.words()[:3] == ["moeshard", "harness", "down"])
    assert [l.words()[:3] for l in lines][0] == ["moeshard", "harness", "up"], "the harness lines start with up"
    cluster_id = host0 = None
    try:
        for line in lines:
            w = line.words()
            if w[:3] == ["moeshard", "harness", "up"]:
                out = _ok(_sh(_with_appended(line), timeout=420))
                m = re.search(r"cluster (\S+) up \((\w+)\): (\S+)", out)
                assert m, out
                cluster_id, mode = m.group(1), m.group(2)
                host0 = re.search(r"host 0: (\S+)", out).group(1)
                assert mode == "netns", f"harness came up in {mode} mode, not with namespaces and cgroups: {out}"
                assert re.fullmatch(r"198\.18\.\d+\.2", host0), host0
            elif w[:3] == ["moeshard", "harness", "list"]:
                out = _ok(_sh(line.command, timeout=120))
                assert re.search(rf"(?m)^{re.escape(cluster_id)}\s+netns\s", out), out
            elif w[:2] == ["ip", "netns"]:
                k = host0.split(".")[2]
                cmd = line.command.replace("<id>", cluster_id).replace("198.18.K.2", host0)
                assert "<" not in cmd and ".K." not in cmd, f"a placeholder left unfilled: {cmd}"
                out = _ok(_sh(cmd, timeout=420))
                assert re.search(r"(?m)^\[1\] 1,2,3 -> \d+(,\d+)+$", out), out[-3000:]
                assert "routed experts over 2 actor(s)" in out and f"198.18.{k}." in out, out[-3000:]
            elif w[:3] == ["moeshard", "harness", "down"]:
                out = _ok(_sh(_with_appended(line, cluster_id=cluster_id), timeout=180))
                assert cluster_id in out and "removed" in out, out
                cluster_id = None
            else:
                pytest.fail(f"README.md:{line.lineno}: no runner for harness line `{line.text}`")
    finally:
        if cluster_id is not None:
            subprocess.run([sys.executable, "-m", "cluster.cli", "harness", "down", "--cluster-id", cluster_id],
                           cwd=REPO, env=_env(), capture_output=True, timeout=180)
    assert cluster_id is None, "the README's lines did not bring the cluster down"


# ---- the Ray-cluster block --------------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_ray_cluster_block_submits_the_job(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _env(HOME=str(home))
    head = None
    with_head = None
    try:
        for line in _lines_of("ray_cluster"):
            w = line.words()
            if w[:2] == ["ray", "get-auth-token"]:
                _ok(_sh(line.command, timeout=120, env=env, quiet=True))  # its output is the token
                token = home / ".ray" / "auth_token"
                assert token.is_file() and len(token.read_text().strip()) >= 32, "no token written"
                # The cluster uses this token, as `ray up` copies it to the nodes.
                with_head = private_head(token_path=token, env=env)
                head = with_head.__enter__()
            elif w[0] == "export":
                name, _, value = w[1].partition("=")
                env[name] = value
            elif w[:3] == ["ray", "job", "submit"]:
                assert head is not None, "`ray job submit` before the token was generated"
                cmd = line.command.replace("/data/pydoc-moe", str(MODEL)).replace("http://127.0.0.1:8265", head.dashboard)
                assert "RAY_AUTH_TOKEN_PATH" not in env    # the client finds the token in ~/.ray/auth_token
                # The head's job agent registers a little after its jobs server answers; until then Ray
                # refuses the submission with this message, and the job never starts: poll with a deadline.
                deadline = time.monotonic() + 180
                while ("No available agent to submit job" in (proc := _sh(cmd, timeout=600, env=env)).stderr
                       and time.monotonic() < deadline):
                    time.sleep(2)
                out = _ok(proc)
                assert re.search(r"(?m)^\[1\] 'The for statement' -> '", out), out[-3000:]
                assert re.search(r"Job '\S+' succeeded", out) and "routed experts over 2 actor(s)" in out, out[-3000:]
            else:
                pytest.fail(f"README.md:{line.lineno}: no runner for Ray-cluster line `{line.text}`")
        assert head is not None, "the README's Ray-cluster block generates no token"
    finally:
        if with_head is not None:
            with_head.__exit__(None, None, None)


# ---- the serving block ------------------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_serve_lines_and_the_openai_snippet():
    """`moeshard serve` as written (on a free port instead of 8000, which another server may hold), then
    the `curl` line and the python blocks that talk to it, then Ctrl-C."""
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def ported(text: str) -> str:
        return text.replace("--port 8000", f"--port {port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    lines = _lines_of("serve")
    (serve,) = [l for l in lines if l.words()[:2] == ["moeshard", "serve"]]
    clients = [l for l in lines if l is not serve]
    blocks = [(n, code) for n, code in _blocks("python") if SERVED in code]
    assert clients and blocks, "the README's serving block has no client example"
    proc = subprocess.Popen(["bash", "-c", f"exec {ported(serve.command)}"], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _sh(f"curl -sf -m 5 http://127.0.0.1:{port}/health", timeout=30, quiet=True).returncode != 0:
            assert proc.poll() is None, f"`{serve.text}` exited:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"`{serve.text}` did not answer /health within 300s"
            time.sleep(1)
        for line in clients:
            out = _ok(_sh(ported(line.command), timeout=300))
            assert '"choices"' in out and '"text_completion"' in out, out[-3000:]
        for first, code in blocks:
            proc_py = subprocess.run([sys.executable, "-c", ported(code)], cwd=REPO, env=_env(), capture_output=True,
                                     text=True, timeout=300)
            assert proc_py.returncode == 0 and proc_py.stdout.strip(), \
                f"README.md:{first}: python block failed:\n{proc_py.stderr[-3000:]}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)      # its own session: only what this test started
            proc.wait(30)
