"""`python:module:function`: any user function `f(prompts, responses) -> sequence of floats`."""

from __future__ import annotations

import importlib

from moalign.errors import MoalignError
from moalign.objectives.base import Objective, register


@register("python", "any function: python:package.module:function(prompts, responses) -> floats")
class PythonFunction(Objective):
    def __init__(self, argument: str, **options):
        module_name, _, function_name = argument.partition(":")
        if not module_name or not function_name:
            raise MoalignError(f"python objective {argument!r} must read python:module:function")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise MoalignError(f"python objective: cannot import {module_name!r} ({error})") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise MoalignError(f"python objective: {module_name} has no function {function_name!r}")
        self.function = function
        self.options = options
        self.name = function_name

    def _score(self, prompts, responses):
        return self.function(prompts, responses, **self.options)
