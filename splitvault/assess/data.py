"""Natural inputs for an assessment: a file of the model's request inputs, or the demo's data.

Formats (``--data``):

* ``.npz``: one array per request input, by name, rows aligned (``input_ids``,
  ``attention_mask``; or ``image``);
* ``.npy``: the one input of a single-input model;
* ``.txt``: one sentence per line, for text embedders, tokenized with ``--tokenizer`` (a
  Hugging Face tokenizer folder; default the MiniLM demo's);
* ``demo``: the digits demo's 1,797 images for a classifier; for an embedder, English
  sentences from the docstrings of Python's standard library (offline, a few thousand).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from splitvault.assess.stages import Tensors

MAX_TOKENS = 32  # sentences are cut here: most docstring sentences fit, and it keeps training cheap
DOC_MODULES = (
    "argparse", "asyncio.events", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "email.utils",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq",
    "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "mailbox", "mimetypes", "multiprocessing.pool",
    "netrc", "optparse", "os", "pathlib", "pdb", "pickle", "platform", "plistlib", "pprint",
    "queue", "random", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "traceback", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "xmlrpc.client", "zipfile", "zoneinfo",
)  # fmt: skip
_CODE_LIKE = re.compile(r"[>=(){}\[\]_`|\\*#@$<]")


def load_inputs(
    source: str, request_inputs: list[str], task: str, tokenizer: Path | None = None
) -> Tensors:
    """The request inputs named ``request_inputs``, one row per natural sample."""
    if source == "demo":
        return demo_inputs(request_inputs, task)
    path = Path(source)
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text("utf-8").splitlines()]
        return _tokenized([line for line in lines if line], request_inputs, tokenizer)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    elif path.suffix == ".npy":
        if len(request_inputs) != 1:
            raise ValueError(f"the model takes {request_inputs}: give a .npz by input name")
        arrays = {request_inputs[0]: np.load(path, allow_pickle=False)}
    else:
        raise ValueError(f"{path}: expected .npz, .npy, .txt or 'demo'")
    missing = [name for name in request_inputs if name not in arrays]
    if missing:
        raise ValueError(f"{path} lacks the inputs {missing}")
    return {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in request_inputs}


def demo_inputs(request_inputs: list[str], task: str) -> Tensors:
    """The demo's natural data: digits images, or standard-library docstring sentences."""
    if task == "embedding":
        return _tokenized(docstring_sentences(), request_inputs, None)
    if request_inputs != ["image"]:
        raise ValueError("--data demo fits the digits demo (input 'image'); give a data file")
    from splitvault.demo import digits

    data = digits.load_data()
    return {"image": torch.from_numpy(np.concatenate([data.train_x, data.test_x]))}


def docstring_sentences() -> list[str]:
    """Sentences of 6 to 30 words from standard-library docstrings, without code, sorted."""
    found: set[str] = set()
    for module_name in DOC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module this Python lacks (tkinter-less builds and the like)
            continue
        with warnings.catch_warnings():  # reading a deprecated alias's docstring warns
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = _docstrings(module)
        for doc in docs:
            text = " ".join(doc.split())
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if 6 <= len(sentence.split()) <= 30 and _is_prose(sentence):
                    found.add(sentence)
    return sorted(found)


def _docstrings(module: object) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for _, member in inspect.getmembers(module):
        if inspect.isclass(member) or inspect.isfunction(member):
            docs.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            docs += [
                inspect.getdoc(m) or "" for _, m in inspect.getmembers(member, inspect.isfunction)
            ]
    return docs


def _is_prose(sentence: str) -> bool:
    return sentence[0].isupper() and sentence.endswith(".") and not _CODE_LIKE.search(sentence)


def _tokenized(sentences: list[str], request_inputs: list[str], tokenizer: Path | None) -> Tensors:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from splitvault.demo import minilm

    tokenize = AutoTokenizer.from_pretrained(str(tokenizer or minilm.model_path()))
    encoded = tokenize(
        sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
    missing = [name for name in request_inputs if name not in encoded]
    if missing:
        raise ValueError(f"the tokenizer gives no {missing}; give a .npz by input name")
    return {name: encoded[name] for name in request_inputs}
