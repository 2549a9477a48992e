"""Rule rewards (``reward.rule``): named as ``module:function`` or ``path/to/rules.py:function``;
every way a rule can be wrong (at import, in its arity, in what it returns or raises, at the
probe and during training) is a one-line ConfigError that names the spec; good rules score
exactly what the function itself returns."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from remax_megatron.config_io import ConfigError
from remax_megatron.reward import Scored
from remax_megatron.reward.rule import PROBE_RESPONSES, RuleReward, load_rule
from remax_megatron.training import demo

TEXTS = [("tell me about", " the lazy dog ."), ("hello", ""), ("a", " b c d e f g")]


def items(texts=TEXTS):
    return [Scored(i, p, r, [1], [2], False) for i, (p, r) in enumerate(texts)]


def one_line_error(make, spec, needle):
    """``make()`` fails with a one-line ConfigError naming ``spec`` and holding ``needle``."""
    with pytest.raises(ConfigError) as err:
        make()
    message = str(err.value)
    assert "\n" not in message and "\r" not in message, message
    assert spec in message, message
    assert needle in message, message
    return message


def write(path, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


# module-spec rules (tests/ is on sys.path under pytest and in conftest.worker_env)
def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def star_args(*args):
    return [1.0] * len(args[1])


NOT_A_FUNCTION = 3


# --- loading: every bad spec --------------------------------------------------------------------

LOAD_CASES = {
    # name: (file contents or None, spec relative to tmp_path ("{d}" is tmp_path), needle)
    "no_colon": (None, "no_colon", "must look like module.path:function_name"),
    "empty_function": (None, "test_rule_reward:", "must look like"),
    "module_missing": (None, "no_such_module_xyz:f",
                       "reward.rule: cannot import no_such_module_xyz"),
    "file_missing": (None, "{d}/nope.py:f", "no such file"),
    "not_a_py_file": ("x = 1\n", "{d}/rules.txt:f", "is not a .py file"),
    "syntax_error": ("def f(prompts, responses)\n    return []\n", "{d}/rules.py:f",
                     "raised SyntaxError"),
    "raises_at_import": ("x = 1\nraise RuntimeError('no GPU\\nhere')\n", "{d}/rules.py:f",
                         "raised RuntimeError: no GPU here (at rules.py:2)"),
    "exits_at_import": ("import sys\nsys.exit(3)\n", "{d}/rules.py:f",
                        "raised SystemExit: 3 (at rules.py:2)"),
    "missing_dependency": ("import no_such_dependency_xyz\n", "{d}/rules.py:f",
                           "raised ModuleNotFoundError: No module named 'no_such_dependency_xyz' "
                           "(at rules.py:1)"),
    "no_function_in_file": ("def g(prompts, responses):\n    return []\n", "{d}/rules.py:f",
                            "has no function f"),
    "no_function_in_module": (None, "test_rule_reward:nope", "has no function nope"),
    "not_callable": (None, "test_rule_reward:NOT_A_FUNCTION", "is an int (3), not a function"),
    "one_argument": ("def f(responses):\n    return []\n", "{d}/rules.py:f",
                     "takes (responses): it must take (prompts, responses)"),
    "three_arguments": ("def f(a, b, c):\n    return []\n", "{d}/rules.py:f",
                        "takes (a, b, c): it must take (prompts, responses)"),
    "required_keyword": ("def f(prompts, responses, *, scale):\n    return []\n",
                         "{d}/rules.py:f", "it must take (prompts, responses)"),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_bad_rule_fails_to_load_with_one_line(case, tmp_path):
    source, spec, needle = LOAD_CASES[case]
    spec = spec.format(d=tmp_path)
    if source is not None:
        target = tmp_path / spec.rsplit(":", 1)[0].rsplit("/", 1)[1]
        write(target, source)
    one_line_error(lambda: RuleReward(spec), spec, needle)


def test_module_raising_at_import(tmp_path, monkeypatch):
    write(tmp_path / "broken_rules_xyz.py", "raise ValueError('bad config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    one_line_error(lambda: load_rule("broken_rules_xyz:f"), "broken_rules_xyz:f",
                   "cannot import broken_rules_xyz for broken_rules_xyz:f: it raised ValueError: "
                   "bad config (at broken_rules_xyz.py:1)")


# --- what a rule returns or raises: at the probe and during training ----------------------------

RETURN_CASES = {
    # name (the rule is bad_<name>): (function body, needle)
    "none": ("return None", "returned None "),
    "str": ("return '0.5'", "returned a str ('0.5')"),
    "dict": ("return {r: 1.0 for r in responses}", "returned a dict"),
    "float": ("return 0.5", "returned a float (0.5)"),
    "generator": ("return (1.0 for r in responses)", "returned a generator"),
    "too_few": ("return [0.0]", "returned 1 rewards"),
    "too_many": ("return [0.0] * (len(responses) + 1)", " rewards "),
    "nan": ("return [float('nan')] * len(responses)", "returned a non-finite reward nan"),
    "inf": ("return [0.0] + [float('inf')] * (len(responses) - 1)",
            "returned a non-finite reward inf for response 1"),
    "beyond_float32": ("return [1e39] * len(responses)", "beyond float32"),
    "nested_list": ("return [[1.0] for r in responses]", "whose element 0 is a list ([1.0])"),
    "str_elements": ("return ['1.0' for r in responses]", "whose element 0 is a str ('1.0')"),
    "none_elements": ("return [None for r in responses]", "whose element 0 is None"),
    "complex": ("return [1j for r in responses]", "whose element 0 is a complex"),
    "tensor_2d": ("return torch.zeros(len(responses), 1)", "a 2-D tensor of shape"),
    "tensor_0d": ("return torch.tensor(1.0)", "a 0-D tensor"),
    "array_2d": ("return np.zeros((len(responses), 2))", "a 2-D numpy array"),
    "object_array": ("return np.array(['a'] * len(responses), dtype=object)",
                     "a numpy array of dtype object"),
    "raises": ("raise ValueError('no digits in\\n' + repr(responses[0]))",
               "raised ValueError: no digits in '"),
    "raises_in_a_helper": ("return [helper(r) for r in responses]", "raised KeyError"),
    # ended the run after step 2 of 4 with exit code 0 and no message (issue 18)
    "exits": ("import sys; sys.exit(0)", "it must not exit"),
    "exits_quietly": ("raise SystemExit", "raised SystemExit (at rules.py:"),
    # one reward per response of a list it lengthened: passed the probe, then crashed in training
    "appends": ("responses.append('x'); return [0.0] * len(responses)", " rewards "),
}

RULES_HEADER = """\
import numpy as np
import torch


def helper(response):
    return {}[response]
"""


@pytest.fixture
def rules_file(tmp_path):
    source = RULES_HEADER + "".join(
        f"\n\ndef bad_{name}(prompts, responses):\n    {body}\n"
        for name, (body, _) in RETURN_CASES.items())
    return write(tmp_path / "rules.py", source)


@pytest.mark.parametrize("case", sorted(RETURN_CASES))
def test_bad_return_or_raise_at_the_probe(case, rules_file):
    spec = f"{rules_file}:bad_{case}"
    message = one_line_error(lambda: RuleReward(spec, probe_prompts=["tell me about"]), spec,
                             RETURN_CASES[case][1])
    assert "when probed with 2 responses" in message


@pytest.mark.parametrize("case", sorted(RETURN_CASES))
def test_bad_return_or_raise_during_training(case, rules_file):
    spec = f"{rules_file}:bad_{case}"
    reward = RuleReward(spec)  # no probe: the failure comes from score
    message = one_line_error(lambda: reward.score(items()), spec, RETURN_CASES[case][1])
    assert f"for {len(TEXTS)} responses" in message


def test_raise_names_the_line_in_the_rule(rules_file):
    spec = f"{rules_file}:bad_raises_in_a_helper"
    message = one_line_error(lambda: RuleReward(spec).score(items()), spec, "raised KeyError")
    line = rules_file.read_text().splitlines().index("    return {}[response]") + 1
    assert message == (f"reward.rule {spec} raised KeyError: '{TEXTS[0][1]}' (at rules.py:"
                       f"{line}) for 3 responses")


def test_short_length_keeps_the_old_wording():
    reward = RuleReward("test_rule_reward:length_reward")
    reward.function = lambda prompts, responses: [0.0]
    one_line_error(lambda: reward.score(items()), "test_rule_reward:length_reward",
                   "returned 1 rewards for 3 responses: return one float per response")


def test_any_exception_in_training_is_a_config_error():
    """The trainer's _agreed ends every rank only on a ConfigError: score must raise nothing
    else, whatever the rule raises."""
    reward = RuleReward("test_rule_reward:length_reward")
    for exc in (ZeroDivisionError(), AssertionError("x\n\ny"), ConfigError("mine"),
                OSError(2, "gone")):
        def fails(prompts, responses, exc=exc):
            raise exc
        reward.function = fails
        message = one_line_error(lambda: reward.score(items()), "test_rule_reward:length_reward",
                                 f"raised {type(exc).__name__}")
        assert message.endswith("for 3 responses")


# --- good rules ---------------------------------------------------------------------------------

def reference(function, texts=TEXTS):
    """The function's own values (called directly), as the float32 the trainer uses."""
    values = function([p for p, _ in texts], [r for _, r in texts])
    return [float(np.float32(v)) for v in np.asarray(values, dtype=np.float64).tolist()]


def test_module_specs_score_what_the_function_returns():
    reward = RuleReward("test_rule_reward:length_reward", probe_prompts=["a", "b"])
    assert reward.score(items()).tolist() == reference(length_reward)
    assert reward.score(items()).dtype == torch.float32
    spec = "remax_megatron.training.demo:vowel_share"
    reward = RuleReward(spec, probe_prompts=demo.PROMPTS[:1])
    assert reward.score(items()).tolist() == reference(demo.vowel_share)
    assert RuleReward("test_rule_reward:star_args").score(items()).tolist() == [1.0] * 3


GOOD_RULES = """\
import numpy as np
import torch

seen = []


def as_list(prompts, responses):
    seen.append((list(prompts), list(responses)))
    return [len(p) / 7 + len(r) for p, r in zip(prompts, responses)]


def as_tuple(prompts, responses):
    return tuple(0.1 * len(r) for r in responses)


def as_tensor(prompts, responses):
    return torch.tensor([len(r) / 3 for r in responses], dtype=torch.float64)


def as_int_tensor(prompts, responses):
    return torch.tensor([len(r) for r in responses])


def as_array(prompts, responses):
    return np.array([len(r) / 3 for r in responses], dtype=np.float32)


def as_bools(prompts, responses):
    return [r.strip().startswith("the") for r in responses]


def as_numpy_scalars(prompts, responses):
    if responses[0]:
        return [np.float64(len(r)) for r in responses]
    return [np.int64(1)] * len(responses)


def as_scalar_tensors(prompts, responses):
    return [torch.tensor(len(r) / 5) for r in responses]


def with_default(prompts, responses, scale=2.0):
    return [scale * len(r) for r in responses]


class Callable:
    def __call__(self, prompts, responses):
        return [1.5] * len(responses)


instance = Callable()
"""
GOOD = ["as_list", "as_tuple", "as_tensor", "as_int_tensor", "as_array", "as_bools",
        "as_numpy_scalars", "as_scalar_tensors", "with_default", "instance"]


@pytest.mark.parametrize("name", GOOD)
def test_file_specs_score_what_the_function_returns(name, tmp_path, monkeypatch):
    path = write(tmp_path / "sub" / "rules.py", GOOD_RULES)
    monkeypatch.chdir(tmp_path)
    for spec in (f"sub/rules.py:{name}", f"{path}:{name}"):  # relative and absolute
        reward = RuleReward(spec, probe_prompts=["tell me about"])
        values = reward.score(items())
        expected = reference(reward.function)
        assert values.dtype == torch.float32 and values.tolist() == expected, spec


def test_the_probe_passes_the_documented_responses(tmp_path):
    path = write(tmp_path / "rules.py", GOOD_RULES)
    reward = RuleReward(f"{path}:as_list", probe_prompts=["p1", "p2"])
    module = __import__(reward.function.__module__)
    assert module.seen == [(["p1", "p1", "p2", "p2"], list(PROBE_RESPONSES) * 2)]
    assert PROBE_RESPONSES[0] == ""  # an empty response happens in training too


def test_path_with_a_colon_splits_on_the_last_one(tmp_path):
    path = write(tmp_path / "odd:dir" / "rules.py", GOOD_RULES)
    reward = RuleReward(f"{path}:as_tuple", probe_prompts=["p"])
    assert reward.score(items()).tolist() == reference(reward.function)


def test_two_files_with_one_name_do_not_replace_each_other(tmp_path):
    a = write(tmp_path / "a" / "rules.py", "def f(prompts, responses):\n    return [1.0]\n")
    b = write(tmp_path / "b" / "rules.py", "def f(prompts, responses):\n    return [2.0]\n")
    ra, rb = RuleReward(f"{a}:f"), RuleReward(f"{b}:f")
    assert ra.score(items(TEXTS[:1])).tolist() == [1.0]
    assert rb.score(items(TEXTS[:1])).tolist() == [2.0]


# --- the CLI: a rule that raises stops `train` before any model is built -------------------------

def test_cli_rule_that_raises_stops_before_any_model_is_built(tmp_path):
    """NEEDS THE TRAINER WIRING: passes once Trainer._rule_reward builds
    ``RuleReward(spec, probe_prompts=[<first prompt text>])``. Until then the rule first fails
    in training (after the model is built and the run directory made), so this test fails on
    "when probed" / the run directory."""
    from conftest import run_python

    bad = write(tmp_path / "bad.py", "def f(prompts, responses):\n"
                                     "    raise RuntimeError('cannot score\\nthis')\n")
    run = tmp_path / "run"
    proc = run_python(["-m", "remax_megatron", "train", "--output-dir", str(run),
                       f"reward.rule={bad}:f"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"remax-megatron train: error: reward.rule {bad}:f raised RuntimeError: "
                      "cannot score this (at bad.py:2) when probed with 2 responses"], proc.stderr
    assert "runtime:" not in proc.stderr
    assert not run.exists()
