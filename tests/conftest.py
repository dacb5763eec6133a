"""What every test run prints first: the versions it ran with and what the CPU offers, so that a
failure on another machine can be told apart from a failure of the code."""

from importlib.metadata import PackageNotFoundError, version

import pytest


def _environment() -> list[str]:
    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    import torch

    versions = ", ".join(f"{name} {v(name)}" for name in ("torch", "transformers", "tokenizers", "safetensors"))
    return [f"versions: {versions}",
            f"CPU: ATen {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"]


def pytest_report_header(config):
    return _environment()


def pytest_terminal_summary(terminalreporter):  # also under -q, which hides the header
    if terminalreporter.verbosity < 0:
        for line in _environment():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tok():
    """A byte-level BPE tokenizer of 300 merges trained on 100 kB of the standard library (tests/tiny.py)."""
    from tests.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tok):
    """tests/tiny.py's random-weight multimodal model and its tokenizer, saved in the Hugging Face layout.
    Shared by every test module: never write into it."""
    import herd
    from tests.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny_checkpoint")
    herd.save_pretrained(tiny_model(tok), path)
    tok.save(path)
    return path
