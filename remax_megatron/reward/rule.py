"""Rule rewards: a Python function ``f(prompts, responses) -> one float per response``.

``reward.rule`` names it as ``package.module:function`` (importable, e.g. on PYTHONPATH) or as
``path/to/rules.py:function`` (a file, relative to the current directory or absolute; the spec
splits on its last ``:``). Everything that can be wrong with it is a one-line ConfigError that
names the spec: at load (import, missing function, arity), at the probe (one call before any
model is built, see ``RuleReward``) and during training (what it returned or raised), so the
trainer can end every rank with that line.

What a rule may return (the same check at the probe and in training, ``check_rewards``): a list
or tuple of real numbers, or a 1-D torch tensor / numpy array of a real dtype; one per response,
all finite (and finite in float32). Python ints, numpy scalars and 0-d real tensors count as
numbers. Booleans are accepted as 1.0 / 0.0, so a pass/fail check ("is the answer right") can be
returned as is. Strings, None, dicts, generators, nested lists and complex numbers are errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import math
import numbers
import re
import sys
import traceback
from pathlib import Path

import torch

from ..config_io import ConfigError
from . import Reward, Scored

try:
    import numpy as np
except ImportError:  # numpy is optional here: without it no rule can return an ndarray
    np = None

# The probe: every probe prompt is paired with these two responses. The empty one because a
# response that ends at its first token is empty in training too.
PROBE_RESPONSES = ("", " a short answer: 42.")
_FORM = "module.path:function_name or path/to/rules.py:function_name"
_MAX_MESSAGE = 300  # characters of a user's exception message kept in the one line
_file_modules = itertools.count()


def load_rule(spec: str):
    """The function ``spec`` names, imported and checked to take (prompts, responses)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"reward.rule={spec!r} must look like {_FORM}")
    target, name = spec.rsplit(":", 1)  # the last ':': a file path may hold one
    if not target or not name.isidentifier():
        raise ConfigError(f"reward.rule={spec!r} must look like {_FORM}")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _import_file(spec, target) if is_file else _import_module(spec, target, name)
    if not hasattr(module, name):
        raise ConfigError(f"reward.rule {spec}: {target} has no function {name}")
    function = getattr(module, name)
    if not callable(function):
        raise ConfigError(f"reward.rule {spec}: {target}.{name} is {_describe(function)}, "
                          "not a function")
    _check_arity(spec, function)
    return function


def _import_module(spec: str, target: str, name: str):
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", target):
        raise ConfigError(f"reward.rule={spec!r} must look like {_FORM}")
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and (target == err.name or target.startswith(err.name + ".")):
            # the module itself (or its package) is missing, not something it imports
            raise ConfigError(f"reward.rule: cannot import {target} for {spec} ({err}): make it "
                              f"importable (PYTHONPATH) or give a file, path/to/rules.py:{name}"
                              ) from None
        raise ConfigError(f"reward.rule: cannot import {target} for {spec}: it raised "
                          f"{_exception(err)}") from None
    except (Exception, SystemExit) as err:  # anything its own code raises while importing
        raise ConfigError(f"reward.rule: cannot import {target} for {spec}: it raised "
                          f"{_exception(err)}") from None


def _import_file(spec: str, target: str):
    path = Path(target).expanduser().resolve()  # relative paths: to the current directory
    if not path.exists():
        raise ConfigError(f"reward.rule {spec}: no such file {path}")
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"reward.rule {spec}: {path} is not a .py file")
    # A unique name: two rule files both called rules.py must not replace each other.
    module_name = f"_remax_rule_{next(_file_modules)}_" + re.sub(r"\W", "_", path.stem)
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"reward.rule {spec}: cannot load {path} as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # before exec: dataclasses and pickling look it up there
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # SyntaxError included; sys.exit() at import too
        del sys.modules[module_name]
        raise ConfigError(f"reward.rule: cannot import {path} for {spec}: it raised "
                          f"{_exception(err, str(path))}") from None
    return module


def _check_arity(spec: str, function) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(None, None)
    except TypeError:
        # names only: annotations would make the line long and say nothing about the arity
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty)
        raise ConfigError(_one_line(f"reward.rule {spec} takes {bare}: it must take "
                                    "(prompts, responses)")) from None


def check_rewards(spec: str, values, n: int, when: str) -> torch.Tensor:
    """What a rule returned for ``n`` responses, as a float32 tensor [n]; otherwise a one-line
    ConfigError naming the spec and what it returned. ``when`` ends the phrase "returned X ..."
    ("for 16 responses", "when probed with 2 responses")."""
    def bad(what: str, advice: str = "return a list of floats, one per response"):
        return ConfigError(_one_line(f"reward.rule {spec} returned {what} {when}: {advice}"))

    if isinstance(values, torch.Tensor) or (np is not None and isinstance(values, np.ndarray)):
        kind = "tensor" if isinstance(values, torch.Tensor) else "numpy array"
        if values.ndim != 1:
            raise bad(f"a {values.ndim}-D {kind} of shape {tuple(values.shape)}")
        real = (not values.dtype.is_complex if kind == "tensor"
                else values.dtype.kind in "biuf")
        if not real:
            raise bad(f"a {kind} of dtype {values.dtype}")
        items = values.tolist()
    elif isinstance(values, (list, tuple)):
        items = values
    else:
        raise bad(_describe(values))
    if len(items) != n:
        raise bad(f"{len(items)} rewards", "return one float per response")
    floats = []
    for i, item in enumerate(items):
        value = _real(item)
        if value is None:
            raise bad(f"a {type(values).__name__} whose element {i} is {_describe(item)}")
        floats.append(value)
    for i, value in enumerate(floats):
        if not math.isfinite(value):
            raise bad(f"a non-finite reward {value} for response {i}", "return finite floats")
    out = torch.tensor(floats, dtype=torch.float32)
    if not bool(torch.isfinite(out).all()):
        i = int((~torch.isfinite(out)).nonzero()[0])
        raise bad(f"a reward {floats[i]:g} for response {i}, beyond float32 (+-3.4e38)",
                  "return smaller rewards")
    return out


def _real(item) -> float | None:
    """``item`` as a float if it is a real number (bools as 0/1), else None."""
    if isinstance(item, torch.Tensor):
        if item.ndim != 0 or item.dtype.is_complex:
            return None
        item = item.item()
    if isinstance(item, bool) or (np is not None and isinstance(item, np.bool_)):
        return float(item)
    if isinstance(item, numbers.Real):
        try:
            return float(item)
        except OverflowError:  # an int too big for a float
            return math.inf if item > 0 else -math.inf
    return None


class RuleReward(Reward):
    """``reward.rule``: loaded (and checked) now; with ``probe_prompts``, also called once on
    each of them paired with ``PROBE_RESPONSES`` (the empty response and a short text, i.e. 2
    responses per prompt) and its result checked as in training, so a broken rule stops the run
    before any model is built."""

    def __init__(self, spec: str, probe_prompts: list[str] | None = None):
        self.spec = spec
        self.function = load_rule(spec)
        if probe_prompts:
            prompts = [p for p in probe_prompts for _ in PROBE_RESPONSES]
            responses = list(PROBE_RESPONSES) * len(probe_prompts)
            self._call(prompts, responses, f"when probed with {len(responses)} responses")

    def score(self, items: list[Scored]) -> torch.Tensor:
        prompts = [i.prompt_text for i in items]
        responses = [i.response_text for i in items]
        return self._call(prompts, responses, f"for {len(items)} responses")

    def _call(self, prompts: list[str], responses: list[str], when: str) -> torch.Tensor:
        # Any exception, not only ConfigError: the trainer agrees on ConfigErrors across ranks,
        # so every rank ends with this one line instead of the others waiting on a collective.
        n = len(responses)
        try:
            # copies: a rule that changes its lists must not change what its rewards are for
            values = self.function(list(prompts), list(responses))
        except (Exception, SystemExit) as err:  # sys.exit() in a rule must not end the run as done
            code = getattr(self.function, "__code__", None)
            advice = ": a rule returns rewards, it must not exit" if isinstance(
                err, SystemExit) else ""
            raise ConfigError(_one_line(
                f"reward.rule {self.spec} raised "
                f"{_exception(err, code.co_filename if code else None)} {when}{advice}")) from None
        return check_rewards(self.spec, values, n, when)


def _one_line(text: str) -> str:
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


def _short(text: str, limit: int) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value) -> str:
    """``value`` in a few words: its type and a short repr."""
    if value is None:
        return "None"
    kind = type(value).__name__
    article = "an" if kind[0].lower() in "aeiou" else "a"
    text = _short(repr(value), 60)
    # "<generator object ... at 0x7f...>" says no more than the type
    return f"{article} {kind}" if text.startswith("<") else f"{article} {kind} ({text})"


def _exception(err: BaseException, prefer_file: str | None = None) -> str:
    """``ValueError: message (at file.py:12)``; the line is the innermost one in
    ``prefer_file`` (the rule's own file) when the traceback passes through it."""
    if isinstance(err, SyntaxError):
        message, where = err.msg, (f"{Path(err.filename).name}:{err.lineno}"
                                   if err.filename and err.lineno else None)
    else:
        message, where = str(err), None
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if not f.filename.startswith("<") and f.filename != __file__]
        preferred = [f for f in frames if prefer_file and f.filename == prefer_file]
        frame = (preferred or frames or [None])[-1]
        if frame is not None:
            where = f"{Path(frame.filename).name}:{frame.lineno}"
    text = type(err).__name__
    message = _short(message or "", _MAX_MESSAGE)
    text += f": {message}" if message else ""
    return f"{text} (at {where})" if where else text
