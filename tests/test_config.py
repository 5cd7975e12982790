"""ServerArgs: each field's type, choices and bounds are checked at the command line, before anything loads, in
argparse's usage error naming the flag; and wherever a ServerArgs is made (the Engine's keywords, a child's JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time

import msgspec
import pytest
from server_fixture import REPO

from radixserve.config import FlagError, ServerArgs

BAD_FLAGS = [  # (flags, the flag the error names, what the error says)
    (["--port", "70000"], "--port", "<= 65535"),  # a bound (before: the model loaded and "ready" on port 70000)
    (["--schedule-policy", "newest"], "--schedule-policy", "invalid choice"),  # a Literal
    (["--log-level", "loud"], "--log-level", "invalid choice"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static", "<= 1.0"),  # a fraction in (0, 1]
    (["--mem-fraction-static", "0"], "--mem-fraction-static", "> 0.0"),
    (["--tp-size", "0"], "--tp-size", ">= 1"),
    (["--max-running-requests", "many"], "--max-running-requests", "Expected `int`"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout", ">= 0"),
    (["--nnodes", "2", "--tp-size", "2"], "--dist-init-addr", "needs"),  # flags that go together
]


@pytest.mark.parametrize("flags,flag,says", BAD_FLAGS, ids=[" ".join(f[0]) for f in BAD_FLAGS])
def test_a_bad_flag_is_a_usage_error_naming_it(flags: list[str], flag: str, says: str) -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "radixserve", "serve", *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("usage: radixserve serve"), out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("radixserve serve: error:") and flag in error and says in error, error
    assert "ready" not in out.stdout and elapsed < 20, (elapsed, out.stdout)  # nothing was loaded


def test_help_lists_every_flag_with_its_help() -> None:
    out = subprocess.run([sys.executable, "-m", "radixserve", "serve", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings[0] != "-h"}
    assert set(actions) == {"--" + f.name.replace("_", "-") for f in dataclasses.fields(ServerArgs)}
    help_text = " ".join(out.stdout.split())  # argparse wraps lines
    for flag, action in actions.items():
        assert action.help and flag in out.stdout and " ".join(action.help.split()) in help_text, flag
    assert "--schedule-policy {lpm,fcfs}" in out.stdout


def test_cli_values_are_typed() -> None:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = ServerArgs.from_cli_args(parser.parse_args(
        ["--port", "8000", "--mem-fraction-static", "0.5", "--context-length", "512", "--disable-radix-cache",
         "--schedule-policy", "fcfs"]))
    assert (args.port, args.mem_fraction_static, args.context_length, args.disable_radix_cache,
            args.schedule_policy) == (8000, 0.5, 512, True, "fcfs")
    assert ServerArgs.from_cli_args(parser.parse_args([])) == ServerArgs()


def test_every_way_of_making_server_args_is_checked(tmp_path) -> None:
    """By keyword (the Engine's), by replace, and decoded from JSON (each child process) alike."""
    with pytest.raises(FlagError, match="--port 70000: Expected `int` <= 65535"):
        ServerArgs(port=70000)
    with pytest.raises(FlagError, match="--dtype 'float64'"):
        ServerArgs(dtype="float64")
    with pytest.raises(FlagError, match="--max-total-tokens 0"):
        ServerArgs().replace(max_total_tokens=0)
    with pytest.raises(FlagError, match="--router-dp-worker-base-port"):
        ServerArgs(dp_size=4, router_dp_worker_base_port=65534)
    with pytest.raises(msgspec.ValidationError, match=r"<= 1.0 - at `\$.new_token_ratio`"):
        msgspec.json.decode(b'{"new_token_ratio": 2}', type=ServerArgs)
    with pytest.raises(FlagError, match="--enable-metrics and --disable-metrics: give one"):
        ServerArgs(enable_metrics=True, disable_metrics=True)
    with pytest.raises(FlagError, match="--chat-template chatml: No such file"):  # SGLang's names are not read
        ServerArgs(chat_template="chatml")
    works = tmp_path / "works.jinja"  # transformers' own template syntax: loop controls, the generation tag
    works.write_text("{% for m in messages %}{% if loop.index > 9 %}{% break %}{% endif %}"
                     "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    assert ServerArgs(chat_template=str(works)).chat_template == str(works)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")  # no endfor
    with pytest.raises(FlagError, match="--chat-template .*broken.jinja: not a Jinja template"):
        ServerArgs(chat_template=str(broken))
    good = ServerArgs(port=8000, max_total_tokens=100, context_length=None)
    assert msgspec.json.decode(msgspec.json.encode(good), type=ServerArgs) == good
