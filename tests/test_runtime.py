"""plsc.runtime: the thread count an engine gets and the one-line reason shown for a library's error."""

import os

from plsc.runtime import default_threads, first_line


def test_first_line_skips_blank_lines_and_strips():
    assert first_line(RuntimeError("\n\n   (InvalidArgument) bad shape   \n  [stack frame]\n")) == \
        "(InvalidArgument) bad shape"


def test_first_line_of_an_empty_message_is_the_type():
    assert first_line(ValueError()) == "ValueError"
    assert first_line(OSError(" \n ")) == "OSError"


def test_default_threads_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == (os.cpu_count() or 1)
