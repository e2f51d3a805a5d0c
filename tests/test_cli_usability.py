"""What a new user meets on the command line: tables at 80 columns with the token hit rate
first, honest presets, config files not silently overwritten, hints on a connection error,
clean errors for a bad device or a mistyped flag, help on every option, --version, and
`stats --json | head` without a Broken pipe error."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from ultrakv.client import Client
from ultrakv.client.cli import build_parser, main
from ultrakv.client.config_file import PRESETS, load_preset
from ultrakv.client.dashboard import figures, render
from ultrakv.cluster.etcd_server import free_port
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer


@pytest.fixture(scope="module")
def address():
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=128))
    with BackgroundServer(engine) as srv:
        with Client(srv.address) as client:  # one cold and one warm turn of a session
            for text in ("Hello there, this is a prompt of some length.", " And again."):
                assert client.process_request({"text": text, "max_length": 4,
                                               "session_id": "usability"})["success"]
        yield srv.address
    engine.shutdown()


def _no_truncation(text: str) -> None:
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text


def test_stats_fits_80_columns_with_the_token_hit_rate_first(address, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["stats", "--address", address]) == 0
    out = capsys.readouterr().out
    _no_truncation(out)
    stats = Client(address).stats()["totals"]
    rate = stats["cached_tokens"] / stats["prompt_tokens"]
    assert 0 < rate < 1
    assert f"token hit rate {rate:.1%} ({stats['cached_tokens']} of {stats['prompt_tokens']} " \
           "prompt tokens from cache)" in " ".join(out.split())
    assert main(["stats", "--wide", "--address", address]) == 0
    assert "block hit" in capsys.readouterr().out


def test_dashboard_fits_80_columns(address):
    with Client(address) as client:
        first, second = client.stats(), client.stats()
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render(figures(first, second, 1.0), address))
    _no_truncation(console.export_text())


def test_config_generate_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "ultrakv.yaml"
    path.write_text("mine\n")
    assert main(["config", "--generate", "--output", str(path)]) == 2
    assert path.read_text() == "mine\n"
    assert "exists; --force overwrites it" in capsys.readouterr().err
    assert main(["config", "--generate", "--force", "--output", str(path)]) == 0
    assert path.read_text().startswith("# ultrakv node configuration")


def test_presets_are_what_their_names_say():
    prod = load_preset("production")[0]
    assert prod.engine.device == "cuda" and prod.engine.model != "tiny"
    assert prod.server.metrics_port > 0  # a production node is scraped
    assert [p for p in PRESETS if p != "development"
            and load_preset(p)[0].engine.model == "tiny"] == []


def test_the_start_a_server_hint_is_only_for_an_address_nobody_answers():
    # A server that answered UNAVAILABLE itself (stopping, a coordinator with no node yet)
    # was reported as "no ultrakv server answers at ...".
    from ultrakv.client.cli import _unreachable

    assert _unreachable("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                        "Failed to connect to remote host: Connection refused")
    assert _unreachable("DNS resolution failed for nosuchhost:50051")
    assert not _unreachable("Cancelling all calls")
    assert not _unreachable("ring has no nodes: no node is registered and serving")
    assert not _unreachable("the server is shutting down; retry the request (on another server)")


def test_a_connection_error_says_what_to_do(capsys):
    dead = f"127.0.0.1:{free_port()}"
    assert main(["clear-cache", "--address", dead, "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert f"no ultrakv server answers at {dead}" in err
    assert "ultrakv serve --detach" in err and "--address" in err and "ULTRAKV_ADDRESS" in err


def test_a_bad_device_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--device", "cpux"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "device must be auto, cpu, cuda or cuda:N, got 'cpux'" in err
    assert "privateuseone" not in err  # torch's list of every device type
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        Engine(EngineConfig(model="tiny", device="cpux"))


@pytest.mark.parametrize(("argv", "suggestion"), [
    (["test", "--text", "hi", "--max-lenght", "5"], "did you mean --max-length?"),
    (["stat"], "did you mean stats?"),
])
def test_a_mistyped_flag_or_command_gets_a_suggestion(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and suggestion in capsys.readouterr().err


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if action.choices and hasattr(action.choices, "values"):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_and_no_markup(capsys):
    parser = build_parser()
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in _parsers(parser)
               for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    assert "(default 50)" in " ".join(capsys.readouterr().out.split())  # --max-length


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("ultrakv ")


def test_stats_json_into_a_closed_pipe_is_quiet(address, tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "stats", "--json",
                             "--address", address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # like `| head` that has already left
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err, err


def test_batch_names_the_file_line_of_a_malformed_request(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": oops}\n')
    assert main(["batch", str(path), str(tmp_path / "out.jsonl")]) == 2
    assert f"{path}, line 3: not JSON" in capsys.readouterr().err


def test_batch_fails_fast_when_no_server_answers(tmp_path, capsys):
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text('{"text": "a"}\n')
    dead = f"127.0.0.1:{free_port()}"
    # --timeout bounds the retries (the default rides out a coordinator restart for ~11 s).
    assert main(["batch", str(path), str(out), "--address", dead, "--timeout", "2"]) == 2
    assert f"no ultrakv server serves at {dead}" in capsys.readouterr().err
    assert not out.exists()


def test_batch_rows_share_one_schema(address, tmp_path):
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text('{"text": "a", "max_length": 2}\n{"text": "b", "max_length": 0}\n')
    assert main(["batch", str(path), str(out), "--address", address]) == 1  # one failed
    good, bad = (json.loads(line) for line in out.read_text().splitlines())
    assert good["success"] and not bad["success"] and bad["error_field"].endswith("max_length")
    assert sorted(good) == sorted(bad)
