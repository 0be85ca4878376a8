"""Load ``--factory`` as users write it: ``module:function`` from the current folder, or
``path/to/file.py:function``; every failure is a ``CommandError`` that says the fix."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from splitvault.errors import CommandError, first_line
from splitvault.packing.spec import ModelSpec, spec_from_factory_result

RETURN_FIX = "return (module, example_tensor), (module, {input_name: tensor}) or a ModelSpec"


def load_factory(reference: str) -> ModelSpec:
    """Import the factory named by ``reference``, call it and check what it returns."""
    location, _, function_name = reference.rpartition(":")
    if not location or not function_name:
        raise CommandError(
            f"--factory {reference!r} names no function",
            cause="a factory is given as MODULE:FUNCTION or PATH.py:FUNCTION",
            fix="--factory mymodels:make_model (mymodels.py in this folder) or path/to/file.py:make_model",
        )
    module = _import_file(Path(location)) if _is_path(location) else _import_module(location)
    factory = _function(module, function_name, location)
    try:
        result = factory()
    except Exception as error:
        raise CommandError(
            f"the factory {reference} raised an error",
            cause=first_line(error),
            fix=f"fix {function_name}() (--verbose shows the traceback)",
        ) from error
    try:
        return spec_from_factory_result(result)
    except TypeError:
        raise CommandError(
            f"the factory {reference} returned {_describe(result)}",
            cause="splitvault needs the model and an example input to trace it with",
            fix=RETURN_FIX,
        ) from None


def _is_path(location: str) -> bool:
    return location.endswith(".py") or "/" in location or os.sep in location


def _import_module(name: str) -> ModuleType:
    """Import ``name`` with the current folder first on the path, as ``python -m`` would."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise _missing_module(error, name, Path(here)) from error
    except Exception as error:
        raise _import_failed(name, error) from error


def _import_file(path: Path) -> ModuleType:
    """Run ``path`` as a module; its folder goes on the path so it can import its neighbours."""
    if not path.is_file():
        raise CommandError(
            f"factory file {str(path)!r} does not exist",
            cause=f"no such file relative to {os.getcwd()}",
            fix="give the path of the .py file that defines the factory, e.g. models/mlp.py:make",
        )
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem if path.stem not in sys.modules else f"_splitvault_factory_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CommandError(
            f"cannot load {str(path)!r} as Python",
            cause="not a Python source file",
            fix="point --factory at a .py file",
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        del sys.modules[name]
        raise _missing_module(error, str(path), path.resolve().parent) from error
    except Exception as error:
        del sys.modules[name]
        raise _import_failed(str(path), error) from error
    return module


def _missing_module(error: ModuleNotFoundError, name: str, folder: Path) -> CommandError:
    missing = error.name or name
    if name == missing or name.startswith(missing + "."):
        first = name.split(".")[0]
        return CommandError(
            f"cannot import the factory module {name!r}",
            cause=f"no {first}.py or {first}/ in {folder} or on the Python path",
            fix=f"run in the folder holding {first}.py, or pass --factory path/to/{first}.py:FUNCTION",
        )
    return CommandError(
        f"the factory module {name!r} imports {missing!r}, which is not installed",
        cause=first_line(error),
        fix=f"install {missing!r} in this environment (the one running splitvault)",
    )


def _import_failed(name: str, error: Exception) -> CommandError:
    return CommandError(
        f"importing the factory module {name!r} failed",
        cause=first_line(error),
        fix="fix the module so that it imports (--verbose shows the traceback)",
    )


def _function(module: ModuleType, name: str, location: str) -> Callable[[], object]:
    factory = getattr(module, name, None)
    if callable(factory):
        return factory  # type: ignore[no-any-return]
    functions = [
        n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
    ]
    close = difflib.get_close_matches(name, functions, n=1)
    listed = ", ".join(functions[:12]) + (", ..." if len(functions) > 12 else "")
    raise CommandError(
        f"{location} has no function {name!r}",
        cause=f"its functions are {listed}" if functions else "it defines no function",
        fix=f"--factory {location}:{close[0]}"
        if close
        else "name a function of it that returns the model and an example input",
    )


def _describe(result: object) -> str:
    if isinstance(result, tuple):
        kinds = ", ".join(type(item).__name__ for item in result)
        return f"a tuple of ({kinds})"
    return f"a {type(result).__name__}"
