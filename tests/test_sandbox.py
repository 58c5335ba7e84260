"""The code sandbox (reward.sandbox) and the code_tests env. Real child processes, no mocks."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from envs import make_env
from envs.base import check_reset_output, check_step_output
from envs.builtin.code_tests import TASKS, CodeTestsEnv, extract_code, make_problem
from reward import sandbox
from reward.sandbox import SandboxLimits, run_python_tests, sandbox_setup

REPO = Path(__file__).resolve().parents[1]
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15", "assert same(add(2, 2), 4)"]
FAST = SandboxLimits(wall_s=3)


def sandbox_processes() -> list[int]:
    """Pids of live sandbox children (their command line holds the bootstrap source)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"_install_hook" in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def sandbox_folders() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("sandbox-")}


def run_raw(script: str, limits: SandboxLimits) -> tuple[str, str, bool]:
    """Run `script` with the kernel layers only (no audit hook, no harness): what they stop on their own."""
    setup = sandbox_setup()
    with tempfile.TemporaryDirectory() as tmp:
        work = sandbox._make_work_folder(tmp, setup.layers)
        proc, chan = sandbox._spawn(setup, limits, work, ["-c", script])
        try:
            out, err, _, timed_out, _ = sandbox._collect(proc, chan, b"", limits, time.monotonic() + limits.wall_s)
        finally:
            sandbox._kill_group(proc, chan)
    return out.decode(), err.decode(), timed_out


def test_every_wanted_layer_is_active_or_explained():
    setup = sandbox_setup()
    wanted = {"netns", "mountns", "nobody"} if os.geteuid() == 0 else {"userns"}
    missing = wanted - set(setup.layers)
    assert all(any(note.startswith(layer) for note in setup.notes) for layer in missing), setup
    result = run_python_tests("x = 1", ["assert x == 1"])
    assert result.layers == [*setup.layers, "rlimits", "audit"]
    print("sandbox layers:", result.layers, "python:", setup.python, "notes:", setup.notes)


def test_correct_partial_and_syntax_error():
    before = sandbox_folders()
    good = run_python_tests("def add(a, b):\n    return a + b\n", ADD_TESTS)
    assert (good.passed, good.total, good.reward, good.reason) == (4, 4, 1.0, "ok")
    partial = run_python_tests("def add(a, b):\n    return a - b if a > 1 else a + b\n", ADD_TESTS)
    assert (partial.passed, partial.reward, partial.reason) == (2, 0.5, "ok")
    assert "FAILED assert add(10, 5) == 15" in partial.stderr
    broken = run_python_tests("def add(a, b)\n    return a + b\n", ADD_TESTS)
    assert (broken.passed, broken.reward, broken.reason) == (0, 0.0, "syntax error")
    crash = run_python_tests("def add(a, b):\n    return a + b\nadd(1)\n", ADD_TESTS)
    assert crash.reward == 0.0 and crash.reason.startswith("runtime error: TypeError")
    program = "import asyncio, subprocess, multiprocessing, json, re, collections, dataclasses\n" \
              "async def twice(x):\n    return 2 * x\n" + "# padding\n" * 20000
    stdlib = run_python_tests(program, ["assert asyncio.run(twice(2)) == 4"])
    assert (stdlib.reward, stdlib.reason) == (1.0, "ok")  # common imports work; a 200 KB program is fed fine
    assert sandbox_folders() == before  # temp folders are removed


def test_network_is_blocked_and_the_listener_never_accepts():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        attempts = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
                    # catches the first refusal and tries again at the socket level
                    (f"import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', {port}))\nexcept OSError:\n"
                     f"    pass\ns.connect_ex(('127.0.0.1', {port}))\ns.sendto(b'x', ('127.0.0.1', {port}))\n"))
        for code in attempts:
            result = run_python_tests(code + "def add(a, b):\n    return a + b\n", ADD_TESTS, FAST)
            assert (result.reward, result.reason) == (0.0, "blocked: network"), result
        if {"netns", "userns"} & set(sandbox_setup().layers):  # the namespace alone, without the audit hook
            out, _, _ = run_raw(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                                "    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n", FAST)
            assert out.startswith("refused"), out
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_writes_outside_the_temp_folder_are_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = (f"open({str(target)!r}, 'w').write('pwned')",
                f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                f"import os\nos.chdir('/')\nopen({str(target)[1:]!r}, 'w').write('pwned')",
                f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('pwned')")
    for code in attempts:
        result = run_python_tests(code, ["assert True"], FAST)
        assert result.reward == 0.0 and result.reason.startswith("blocked:"), (code, result)
        assert not target.exists()
    assert run_python_tests(attempts[0], ["assert True"], FAST).reason == "blocked: write outside temp folder"
    if "nobody" in sandbox_setup().layers:  # file permissions alone, without the audit hook
        out, _, _ = run_raw(f"try:\n    open({str(target)!r}, 'w')\n    print('wrote')\nexcept OSError as e:\n"
                            "    print('denied', e.errno)\n", FAST)
        assert out.startswith("denied") and not target.exists()
    inside = run_python_tests("import tempfile\nopen('notes.txt', 'w').write('hi')\n"
                              "with tempfile.TemporaryDirectory() as d:\n    open(d + '/x', 'w').write('1')\n",
                              ["assert open('notes.txt').read() == 'hi'"], FAST)
    assert (inside.reward, inside.reason) == (1.0, "ok")


def test_fork_bomb_is_stopped_and_leaves_nothing_behind():
    result = run_python_tests("import os\nwhile True:\n    os.fork()\n", ["assert True"], FAST)
    assert (result.reward, result.reason) == (0.0, "blocked: process spawn")
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 "import ctypes", "import os\nos.kill(1, 0)"):
        assert run_python_tests(code, ["assert True"], FAST).reason.startswith("blocked:"), code
    layers = sandbox_setup().layers
    if "nobody" in layers or "userns" in layers:  # RLIMIT_NPROC alone bounds a real fork bomb
        start = time.monotonic()
        _, _, timed_out = run_raw("import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n        n += 1\n"
                                    "    except OSError:\n        pass\n", SandboxLimits(wall_s=1.5, max_procs=16))
        assert timed_out and time.monotonic() - start < 5
    assert sandbox_processes() == []
    assert subprocess.run(["true"], check=False).returncode == 0


def test_endless_loop_times_out_within_bounded_time():
    start = time.monotonic()
    result = run_python_tests("while True:\n    pass\n", ["assert True"], SandboxLimits(wall_s=1.5))
    assert (result.reward, result.reason) == (0.0, "timeout")
    assert 1.4 < result.wall_s < 3 and time.monotonic() - start < 3.5
    endless_add = "def add(a, b):\n    while True:\n        pass\n"
    slow_test = run_python_tests(endless_add, ADD_TESTS, SandboxLimits(wall_s=1.5))
    assert slow_test.reason == "timeout" and sandbox_processes() == []


def test_print_flood_is_capped():
    limits = SandboxLimits(wall_s=5, max_output_bytes=4096)
    start = time.monotonic()
    result = run_python_tests("while True:\n    print('x' * 1000)\n", ["assert True"], limits)
    assert (result.reward, result.reason) == (0.0, "output limit")
    assert 0 < len(result.stdout) <= 4096 and time.monotonic() - start < 3
    chatty = run_python_tests("print('hello')\ndef add(a, b):\n    return a + b\n", ADD_TESTS, limits)
    assert (chatty.reward, chatty.stdout) == (1.0, "hello\n")


def test_memory_hog_gets_zero():
    limits = SandboxLimits(memory_mb=256)
    for code in ("x = bytearray(2 << 30)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n"):
        result = run_python_tests(code + "def add(a, b):\n    return a + b\n", ADD_TESTS, limits)
        assert (result.reward, result.reason) == (0.0, "memory"), result


def test_reward_hacks_do_not_pay():
    add = "def add(a, b):\n    return a + b\n"
    exits = run_python_tests(add + "import sys\nsys.exit(0)\n", ADD_TESTS, FAST)
    assert exits.reward == 0.0 and exits.reason == "runtime error: SystemExit: 0"
    assert run_python_tests(add + "import os\nos._exit(0)\n", ADD_TESTS, FAST).reward == 0.0
    always_equal = "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()\n"
    assert run_python_tests(always_equal, ["assert same(add(1, 2), 3)"], FAST).reward == 0.0
    # a wrong solution that forges a passing result line on every descriptor the channel could be
    # (its number is inherited from the host process, so it depends on how many files the host has open)
    wrong_add = "def add(a, b):\n    return a - b\n"
    forged = wrong_add + "import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'RESULT x 4 4 ok\\n')\n" \
                         "    except OSError:\n        pass\n"
    result = run_python_tests(forged, ADD_TESTS, FAST)
    assert result.reward == 0.0 and result.reason.startswith("blocked: tampering"), result
    rewrite_tests = "import gc\nfor o in gc.get_objects():\n    if isinstance(o, list) and 'assert add(1, 2) == 3' in o:\n" \
                    "        o[:] = ['pass'] * len(o)\n"
    assert run_python_tests(rewrite_tests, ADD_TESTS, FAST).reason == "blocked: introspection"


# ------------------------------------------------------------------------------------------- env
def test_reference_solutions_pass_every_task():
    env = CodeTestsEnv()
    for task in TASKS:
        for seed in (0, 1):
            obs, info = check_reset_output("code_tests", env.reset(seed=seed, options={"task": task}))
            assert info == {"task": task} and obs[0]["role"] == "user" and "```python" in obs[0]["content"]
            answer = f"<think>plan</think>Here it is:\n```python\n{env.problem.reference}```\nDone."
            obs, reward, terminated, truncated, info = check_step_output("code_tests", env.step(answer))
            assert (obs, reward, terminated, truncated) == ([], 1.0, True, False), (task, seed, info)
            assert info["passed"] == info["total"] > 0 and info["reason"] == "ok"
            assert all(isinstance(v, (str, int, float)) for v in info.values())


def test_wrong_and_malformed_answers():
    env = CodeTestsEnv(tasks=["calc"])
    env.reset(seed=3)
    _, reward, *_ , info = env.step("```python\ndef calc(a, b):\n    return 0\n```")
    assert reward < 1.0 and info["reason"] == "ok" and info["passed"] < info["total"]
    _, reward, *_, info = env.step("I don't know.")
    assert reward == 0.0 and info["reason"] == "syntax error"
    with pytest.raises(TypeError, match="code_tests.step expects the policy's text"):
        env.step(["def calc(a, b): return a + b"])
    with pytest.raises(ValueError, match="unknown or empty tasks"):
        CodeTestsEnv(tasks=["nope"])


def test_seeds_vary_parameters_deterministically():
    prompts = {make_problem("is_multiple", seed).prompt for seed in range(20)}
    assert len(prompts) > 3 and make_problem("fizzbuzz", 5) == make_problem("fizzbuzz", 5)
    env = CodeTestsEnv()
    assert env.reset(seed=11) == env.reset(seed=11)
    assert len({env.reset(seed=s)[1]["task"] for s in range(40)}) > 8


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "a = 1\n\nb = 2\n"
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("<think>```python\nbad\n```</think>d = 4") == "d = 4"
    assert extract_code("```python\ne = 5") == "e = 5"  # cut off before the closing fence


def test_config_builds_the_env():
    conf = yaml.safe_load((REPO / "conf/env/code_tests.yaml").read_text())
    env = make_env(conf["name"], kwargs=conf["kwargs"])
    assert isinstance(env, CodeTestsEnv) and conf["num_actors"] >= 1
