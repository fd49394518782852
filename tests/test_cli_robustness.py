"""Every CLI subcommand fed random bytes, random JSON and random option values: it exits 0 or
2 (1 only for `corpus check`, which reports problems that way) with at most one error line,
never a traceback, never a hang. Runs in-process on the tiny model, each call under an alarm."""

from __future__ import annotations

import io
import json
import signal
import string
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emolens.bank import random_bank
from emolens.cli import main
from emolens.concepts import emotions
from tests.conftest import save_for_cli, tiny_llama

SECONDS = 90  # a call still running after this is a hang

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
contents = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v) + "\n"),
    st.lists(json_values.map(json.dumps), max_size=5).map(lambda rows: "\n".join(rows) + "\n"),
    st.integers(1000, 50_000).map(lambda depth: "[" * depth + "]" * depth + "\n"),
    st.just(""),
    st.just('{"text": "a fine line"}\n"another"\n'),
    st.just('[{"role": "user", "content": "hi"}]'),
)
values = st.one_of(
    st.text(alphabet=string.printable + "éß中\u2028\x00", max_size=16),
    st.integers(-(10**12), 10**12).map(str),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "-1",
            "0",
            "1e9",
            "",
            " ",
            "calm",
            "calm=0.05",
            "calm=1e9",
            "random:x=0.1",
            "at ease=0.1",
            "1,2",
            "all",
            "none",
            "99",
        ]
    ),  # fmt: skip
)


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")

    def make_bank(lm):
        bank = random_bank(emotions(), [1, 2, 3], lm.width, norm=2.0)
        bank.default_layer = 2
        return bank

    _, _, options = save_for_cli(root, tiny_llama(context=2048), make_bank)
    return root, options


def call(argv: list[str], lines: list[str] | None = None) -> tuple[int, str]:
    """Run the CLI in-process under an alarm; returns (exit code, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    feed = iter(lines or [])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    import builtins

    saved_input, builtins.input = builtins.input, fake_input
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse errors
                code = stop.code if isinstance(stop.code, int) else 2
    except Timeout:
        pytest.fail(f"hang past {SECONDS} s: emolens {' '.join(argv)}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        builtins.input = saved_input
    return code, err.getvalue()


def check(
    argv: list[str], allowed: tuple[int, ...] = (0, 2), lines: list[str] | None = None
) -> None:
    code, err = call(argv, lines)
    assert "Traceback" not in err, f"emolens {argv}:\n{err}"
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) <= 1, f"emolens {argv}: {errors}"
    assert code in allowed, f"emolens {argv} exited {code}:\n{err}"


def pick(draw, options: dict[str, st.SearchStrategy]) -> list[str]:
    """Some of `options`, each with a drawn value (None: a flag)."""
    chosen = draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=4))
    argv = []
    for name in chosen:
        value = draw(options[name]) if options[name] is not None else None
        argv += [name] if value is None else [name, value]
    return argv


FUZZ = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@FUZZ
@given(data=st.data())
def test_read_steer_export_and_info(setup, tmp_path_factory, data):
    root, options = setup
    folder = tmp_path_factory.mktemp("run")
    draw = data.draw
    source = folder / "input.json"
    payload = draw(contents)
    source.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    read_options = {"--top": values, "--layer": values, "--smooth": values, "--emotions": values,
                    "--per": values, "--variant": values, "--json": None, "--pool": values,
                    "--batch-size": values, "--html": st.just(str(folder / "h.html")),
                    "--plot": st.sampled_from([str(folder / "p.png"), str(folder / "p.xyz"), str(folder)])}  # fmt: skip
    mode = draw(st.sampled_from(["text", "chat", "file", "generate"]))
    head = {"text": [draw(values)], "chat": ["--chat", str(source)],
            "file": ["--file", str(source), "--out", str(folder / "scores.jsonl")],
            "generate": ["--generate", draw(values), "--max-new-tokens", draw(st.sampled_from(["3", "0", "x", "-2"]))]}[mode]  # fmt: skip
    baseline = [
        "--baseline",
        draw(st.sampled_from(["none", str(source)])),
    ]  # neutral: too long here
    check(["read", *head, *options, *baseline, *pick(draw, read_options)])
    steer_options = {"--layer": values, "--positions": values, "--temperature": values,
                     "--top-p": values, "--seed": values, "--allow-strong": None}  # fmt: skip
    check(["steer", draw(values), "--emotion", draw(values), "--max-new-tokens", "3", *options,
           *pick(draw, steer_options)])  # fmt: skip
    out = str(folder / draw(st.sampled_from(["v.gguf", "v.npz", "v.safetensors", "v.txt", ""])))
    export_options = {
        "--layers": values,
        "--scale": values,
        "--format": values,
        "--variant": values,
    }
    check(["export", out, "--emotion", draw(values), *options, *pick(draw, export_options)])
    check(["info", "--model", draw(st.sampled_from([str(source), draw(values), str(folder)]))])


@FUZZ
@given(data=st.data())
def test_corpus_build_report_and_experiment(setup, tmp_path_factory, data):
    root, options = setup
    folder = tmp_path_factory.mktemp("run")
    draw = data.draw
    payload = draw(contents)
    source = folder / "input.jsonl"
    source.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    check(["corpus", "check", str(source)], allowed=(0, 1, 2))
    build_options = {"--layers": values, "--offset": values, "--variance": values,
                     "--batch-size": values, "--checkpoint-every": values}  # fmt: skip
    check(["build", *options[:2], "--corpus", str(source), "--out", str(folder / "bank"),
           *pick(draw, build_options)])  # fmt: skip
    report_options = {"--layer": values, "--norms": st.just(str(source)),
                      "--heldout": st.just(str(source)), "--out": st.just(str(folder / "r"))}  # fmt: skip
    bank = draw(st.sampled_from([options[3], str(source)]))
    check(["report", *options[:2], "--bank", bank, "--no-steering", "--no-transfer", "--quiet",
           *pick(draw, report_options)])  # fmt: skip
    experiment_options = {"--emotions": values, "--opponents": values, "--steer": values,
                          "--strength": values, "--layers": values, "--samples": values,
                          "--sweep": st.just(str(source)), "--activities": st.just(str(source))}  # fmt: skip
    check(["experiment", "preferences", *options, "--limit", "2", "--random", "0",
           "--out", str(folder / "x"), *pick(draw, experiment_options)])  # fmt: skip
    generate_options = {"--emotions": values, "--topics": values, "--per-topic": values,
                        "--temperature": values, "--batch-size": values}  # fmt: skip
    check(["corpus", "generate", *options[:2], "--out", str(folder / "gen.jsonl"), "--topics", "0",
           "--emotions", "calm", "--max-new-tokens", "6", *pick(draw, generate_options)])  # fmt: skip


@FUZZ
@given(lines=st.lists(values, max_size=5))
def test_chat_survives_any_input_lines(setup, lines):
    _, options = setup
    check(["chat", *options, "--max-new-tokens", "3"], lines=lines)
